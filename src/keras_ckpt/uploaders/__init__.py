"""Storage backends that mirror checkpoints to S3, GCS, Azure Blob or file://."""

from keras_ckpt.uploaders.base import Uploader
from keras_ckpt.uploaders.base import UploaderOptions
from keras_ckpt.uploaders.registry import get_uploader
from keras_ckpt.uploaders.registry import register_uploader

__all__ = ["Uploader", "UploaderOptions", "get_uploader", "register_uploader"]
