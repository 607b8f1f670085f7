"""Storage backends that mirror checkpoints to S3, GCS, Azure Blob or file://."""

from keras_ckpt.uploaders.base import Uploader
from keras_ckpt.uploaders.base import UploaderOptions
from keras_ckpt.uploaders.registry import get_uploader
from keras_ckpt.uploaders.registry import register_uploader
from keras_ckpt.uploaders.upload_options import AzureUploadOptions
from keras_ckpt.uploaders.upload_options import GCSUploadOptions
from keras_ckpt.uploaders.upload_options import S3UploadOptions

__all__ = [
    "AzureUploadOptions", "GCSUploadOptions", "S3UploadOptions", "Uploader",
    "UploaderOptions", "get_uploader", "register_uploader",
]
