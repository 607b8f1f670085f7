"""The engine: what a checkpoint holds, how it is written, when, and resume."""
