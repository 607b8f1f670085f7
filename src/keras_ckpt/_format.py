"""Formatting shared by the training logs and the CLI."""


def human_size(size):
    """`85000` -> `"83.0 KiB"`: binary units, as `ls -h` and the CLI print."""
    size = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
