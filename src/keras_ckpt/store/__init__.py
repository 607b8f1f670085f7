"""Stores: the local checkpoint directory and the S3, GCS, Azure Blob and
file:// mirrors, behind one interface (`Store`)."""

from keras_ckpt.store.base import Store
from keras_ckpt.store.base import Uploader
from keras_ckpt.store.base import UploaderOptions
from keras_ckpt.store.local import LocalStore
from keras_ckpt.store.options import AzureUploadOptions
from keras_ckpt.store.options import GCSUploadOptions
from keras_ckpt.store.options import S3UploadOptions
from keras_ckpt.store.registry import get_uploader
from keras_ckpt.store.registry import register_uploader

__all__ = [
    "AzureUploadOptions", "GCSUploadOptions", "LocalStore",
    "S3UploadOptions", "Store", "Uploader", "UploaderOptions",
    "get_uploader", "register_uploader",
]
