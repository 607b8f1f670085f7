from keras_ckpt.callbacks.checkpoint import Checkpoint
