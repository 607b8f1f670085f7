from keras_ckpt.callbacks.checkpoint import Checkpoint
from keras_ckpt.callbacks.export import ExportSavedModel
