"""SavedModel export in the directory layout each serving platform expects.

| layout | where `saved_model.pb` goes | served by |
|---|---|---|
| `"plain"` | `<export_dir>/<version>/` | TensorFlow Serving (numeric version dirs) |
| `"sagemaker"` | `<export_dir>/<version>/` (`export_dir` is `$SM_MODEL_DIR`) | SageMaker's TensorFlow Serving container |
| `"vertex"` | `<export_dir>/` itself, no version dir (`$AIP_MODEL_DIR`) | Vertex AI prebuilt TF containers |

A local export is written to a hidden sibling temp dir and renamed into
place, so a crash never leaves a partial SavedModel where a server would load
it. A remote export (`gs://`, `s3://`, `az://`, `file://`) is written locally
and uploaded with `saved_model.pb` last: serving platforms look for that file,
so an interrupted upload does not look like a model.
"""

import numbers
import os
import shutil
import tempfile

from keras_ckpt import sources
from keras_ckpt.errors import ExportExistsError

LAYOUTS = ("plain", "sagemaker", "vertex")
DEFAULT_VERSION = 1
SAVED_MODEL_FILENAME = "saved_model.pb"
SIGNATURES = ("serve", "serving_default")


def export_saved_model(
    model,
    export_dir,
    layout="plain",
    version=None,
    *,
    overwrite=False,
    uploader_factory=None,
):
    """Exports a Keras model as a SavedModel for serving.

    The SavedModel holds the model's inference forward pass (`training=False`:
    dropout off, batch normalization with its moving statistics) under the
    signatures `serve` and `serving_default`, both taking the model's inputs
    by name. It does not need the model's Python code to load.

    Args:
        model: A built `keras.Model`.
        export_dir: str or `os.PathLike`, the export root: a local directory
            or a URL (`gs://`, `s3://`, `az://`, `file://`). A URL is written
            to a local temp dir first, then uploaded.
        layout: str, `"plain"` or `"sagemaker"` (the SavedModel goes in
            `<export_dir>/<version>/`) or `"vertex"` (directly in
            `<export_dir>`, no version dir). Defaults to `"plain"`.
        version: int, the version dir for `"plain"` and `"sagemaker"`: a
            non-negative integer (TensorFlow Serving only loads numeric
            version dirs and serves the highest). Must be None for
            `"vertex"`. Defaults to `None`, meaning `1`.
        overwrite: bool, whether to replace a model already at the
            destination. Defaults to `False`, which raises
            `ExportExistsError` instead.
        uploader_factory: callable taking the destination URL and returning
            the `keras_ckpt.store.Uploader` to write it with (to pass
            options: `lambda url: keras_ckpt.get_uploader(url, retries=8)`).
            Defaults to `None`, meaning `keras_ckpt.get_uploader`.

    Returns:
        str, the directory (or URL) that holds `saved_model.pb`.

    Raises:
        ValueError: if `layout` or `version` is invalid, or the model is not
            built.
        ExportExistsError: if the destination already holds files and
            `overwrite` is False.
        MissingDependencyError: if `export_dir` is a URL whose cloud SDK is
            not installed.
        StorageError: if the upload fails.

    Example:

    ```python
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    path = keras_ckpt.export_saved_model(model, "export", version=3)
    # path == "export/3" (absolute)
    reloaded = tf.saved_model.load(path)
    outputs = reloaded.signatures["serving_default"](
        **{name: tf.zeros((1, 4)) for name in
           reloaded.signatures["serving_default"].structured_input_signature[1]}
    )
    ```
    """
    if layout not in LAYOUTS:
        raise ValueError(
            "Invalid value for argument `layout`. "
            f"Received: layout={layout!r}. Expected one of {LAYOUTS}."
        )
    version = validate_version(version, layout)
    if not getattr(model, "built", False):
        raise ValueError(
            "The model must be built before it can be exported: call it on a "
            "batch of data, call `model.build(input_shape)`, or create it "
            f"with `keras.Input`. Received an unbuilt model: {model!r}"
        )
    export_dir = os.fspath(export_dir)
    subdir = None if layout == "vertex" else str(version)
    if sources.is_url(export_dir):
        root = export_dir.rstrip("/")
        with tempfile.TemporaryDirectory(prefix="keras_ckpt-export-") as tmp:
            local = os.path.join(tmp, "saved_model")
            _write_saved_model(model, local)
            _upload_tree(local, root, subdir, overwrite=overwrite,
                         uploader_factory=uploader_factory)
        return root if subdir is None else f"{root}/{subdir}"
    target = os.path.abspath(export_dir)
    if subdir is not None:
        target = os.path.join(target, subdir)
    _export_local(model, target, overwrite)
    return target


def validate_version(version, layout):
    if layout == "vertex":
        if version is not None:
            raise ValueError(
                "Invalid value for argument `version`: layout=\"vertex\" writes "
                "saved_model.pb at the root of `export_dir`, without a version "
                f"dir. Received: version={version!r}. Expected None."
            )
        return None
    if version is None:
        return DEFAULT_VERSION
    if (
        isinstance(version, bool)
        or not isinstance(version, numbers.Integral)
        or version < 0
    ):
        raise ValueError(
            "Invalid value for argument `version`. "
            f"Received: version={version!r}. Expected a non-negative int "
            "(TensorFlow Serving only loads numeric version dirs)."
        )
    return int(version)


def _write_saved_model(model, path):
    """Writes the SavedModel and checks it has the signatures servers call."""
    model.export(path, format="tf_saved_model", verbose=False)
    from keras_ckpt import _keras_compat

    found = set(_keras_compat.saved_model_signatures(
        os.path.join(path, SAVED_MODEL_FILENAME)))
    missing = [name for name in SIGNATURES if name not in found]
    if missing:
        raise ValueError(
            f"Keras wrote a SavedModel without the signature(s) {missing} "
            f"(found {sorted(found)}); TensorFlow Serving, SageMaker and "
            "Vertex AI call `serving_default`."
        )


def _export_local(model, target, overwrite):
    parent = os.path.dirname(target)
    name = os.path.basename(target)
    _check_destination(target, overwrite)
    os.makedirs(parent, exist_ok=True)
    # A hidden, non-numeric sibling: TensorFlow Serving ignores it, and the
    # rename below is atomic because it stays on the same filesystem.
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        _write_saved_model(model, tmp)
        _move_into_place(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_destination(target, overwrite):
    if overwrite or not os.path.lexists(target):
        return
    if os.path.isdir(target) and not os.listdir(target):
        return
    raise ExportExistsError(
        f"Cannot export to {target}: it already exists and is not empty. "
        "Pick another `version`, remove it, or pass `overwrite=True`."
    )


def _move_into_place(tmp, target, overwrite):
    if os.path.isdir(target) and not os.path.islink(target):
        if not os.listdir(target):
            os.rmdir(target)
        elif overwrite:
            old = tempfile.mkdtemp(
                prefix=f".{os.path.basename(target)}.old-", dir=os.path.dirname(target)
            )
            os.rename(target, os.path.join(old, "model"))
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
            return
        else:  # Filled since the check, e.g. by a concurrent export.
            _check_destination(target, overwrite=False)
    elif os.path.lexists(target):
        if not overwrite:
            _check_destination(target, overwrite=False)
        os.remove(target)
    os.rename(tmp, target)


# --- remote destinations -------------------------------------------------
# The only code that talks to the uploader. It uses three primitives of
# `keras_ckpt.store.Uploader` (rooted at the export root, names relative
# to it): `list_files() -> {name: size}`, `delete_file(name)` and
# `upload_file(local_path, name)`, each retried by the uploader itself.


def _upload_tree(local_dir, url, subdir=None, *, overwrite=False, uploader_factory=None):
    """Uploads the SavedModel in `local_dir` to `url[/subdir]`, saved_model.pb last."""
    if uploader_factory is None:
        from keras_ckpt.store import get_uploader as uploader_factory
    uploader = uploader_factory(url)
    prefix = "" if subdir is None else f"{subdir}/"
    target = url if subdir is None else f"{url}/{subdir}"
    existing = {name for name in uploader.list_files() if name.startswith(prefix)}
    if existing and not overwrite:
        raise ExportExistsError(
            f"Cannot export to {target}: it already holds {len(existing)} "
            f"file(s) (e.g. {url}/{sorted(existing)[0]}). Pick another "
            "`version`, remove them, or pass `overwrite=True`."
        )
    model_file = prefix + SAVED_MODEL_FILENAME
    if model_file in existing:
        # Gone first, so a crash mid-upload leaves no model that looks whole.
        uploader.delete_file(model_file)
    names = []
    for root, _, files in os.walk(local_dir):
        for filename in files:
            path = os.path.join(root, filename)
            names.append(prefix + os.path.relpath(path, local_dir).replace(os.sep, "/"))
    names.sort(key=lambda name: (name == model_file, name))
    for name in names:
        local_path = os.path.join(local_dir, *name[len(prefix):].split("/"))
        uploader.upload_file(local_path, name)
    # Files of the replaced export that the new one does not have (e.g. a
    # different number of variable shards); unreferenced, so removed last.
    for name in sorted(existing - set(names)):
        uploader.delete_file(name)
