"""URL scheme -> `Store` class, imported on first use.

Built-in schemes map to dotted paths, so importing keras_ckpt never imports a
cloud SDK; the module (and its SDK) is imported the first time its scheme is
used. A missing SDK becomes a `MissingDependencyError` with the exact
`pip install` line.
"""

import importlib
import threading
import urllib.parse

from keras_ckpt.errors import MissingDependencyError
from keras_ckpt.store import options as upload_options_lib
from keras_ckpt.store.base import Store
from keras_ckpt.store.base import UploaderOptions

# scheme -> "module:Class" or a Store subclass.
_REGISTRY = {
    "file": "keras_ckpt.store.local:LocalStore",
    "s3": "keras_ckpt.store.s3:S3Store",
    "gs": "keras_ckpt.store.gcs:GCSStore",
    "az": "keras_ckpt.store.azure:AzureStore",
}
# scheme -> (top-level modules of its SDK, the keras-ckpt extra installing it)
_EXTRAS = {
    "s3": (("boto3", "botocore", "s3transfer"), "s3"),
    "gs": (("google",), "gcs"),
    "az": (("azure",), "azure"),
}
_LOCK = threading.Lock()


def register_uploader(scheme, uploader, clobber=False):
    """Makes `get_uploader()` use `uploader` for URLs `<scheme>://...`.

    Args:
        scheme: str, the URL scheme, e.g. `"minio"` (without `://`).
        uploader: a `Store` subclass, or its dotted path
            `"package.module:Class"`, imported on first use.
        clobber: bool, replace an existing registration of `scheme`.
            Defaults to `False`.

    Raises:
        ValueError: `scheme` is already registered and `clobber` is False.

    Example:

    ```python
    class MyStore(keras_ckpt.store.Store):
        ...  # implement _upload_file, _download_file, _list, ...

    keras_ckpt.register_uploader("mystore", MyStore)
    keras_ckpt.Checkpoint(mirror="mystore://bucket/run-1")
    ```
    """
    if not isinstance(scheme, str) or not scheme or "://" in scheme or (
        urllib.parse.urlsplit(f"{scheme}://x").scheme != scheme.lower()
    ):
        raise ValueError(
            f"Invalid value for argument `scheme`. Received: scheme={scheme!r}."
            ' Expected a URL scheme such as "s3", without "://".'
        )
    scheme = scheme.lower()
    if isinstance(uploader, str):
        if ":" not in uploader:
            raise ValueError(
                "Invalid value for argument `uploader`. Received: "
                f"uploader={uploader!r}. Expected a Store subclass or a "
                'dotted path "package.module:Class".'
            )
    elif not (isinstance(uploader, type) and issubclass(uploader, Store)):
        raise ValueError(
            "Invalid value for argument `uploader`. Received: "
            f"uploader={uploader!r}. Expected a subclass of "
            "keras_ckpt.store.Store or a dotted path "
            '"package.module:Class".'
        )
    with _LOCK:
        current = _REGISTRY.get(scheme)
        if current is not None and current != uploader and not clobber:
            raise ValueError(
                f"An uploader is already registered for scheme `{scheme}` "
                f"({_describe(current)}). Pass clobber=True to replace it."
            )
        _REGISTRY[scheme] = uploader


def get_uploader(url, **options):
    """Returns the `Store` for a mirror URL.

    Args:
        url: str, e.g. `"s3://bucket/prefix"`, `"gs://bucket/prefix"`,
            `"az://container/prefix"` or `"file:///absolute/path"`; or a
            `Store`, returned as is.
        **options: `UploaderOptions` fields (`retries`, `timeout`, ...), or
            `options=UploaderOptions(...)`; and the store's upload options
            (`S3UploadOptions`, `GCSUploadOptions`, `AzureUploadOptions`:
            `ServerSideEncryption`, `kms_key_name`, `encryption_scope`, ...),
            or `upload_options=S3UploadOptions(...)`. Options in the
            environment variable `KERAS_CKPT_UPLOAD_OPTIONS` (a JSON object
            or `KEY=VALUE;KEY=VALUE`) apply underneath these, and so do the
            CLI's `--upload-option KEY=VALUE` flags.

    Returns:
        A `Store` instance.

    Raises:
        ValueError: the URL has an unknown scheme or is malformed, or a
            option is unknown to the store or has an invalid value.
        MissingDependencyError: the scheme's SDK is not installed; the
            message says which `pip install 'keras-ckpt[...]'` to run.

    Example:

    ```python
    uploader = keras_ckpt.get_uploader(
        "s3://my-bucket/run-1", retries=8, ServerSideEncryption="aws:kms")
    uploader.check()
    ```
    """
    if isinstance(url, Store):
        if options:
            raise ValueError(
                f"Options {sorted(options)} cannot be applied to an existing "
                f"{type(url).__name__}; construct it with them instead."
            )
        return url
    if not isinstance(url, str):
        raise ValueError(
            f"Invalid value for argument `url`. Received: url={url!r}. "
            'Expected a URL such as "s3://bucket/prefix" or a Store.'
        )
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    cls = _uploader_class(scheme, url)
    defaults, source = upload_options_lib.defaults()
    for given, fields in (
        ("options", upload_options_lib.field_names(UploaderOptions)),
        ("upload_options",
         upload_options_lib.field_names(cls.upload_options_class)),
    ):
        if options.get(given) is not None:  # an object given explicitly
            defaults = {k: v for k, v in defaults.items() if k not in fields}
    try:
        return cls(url, **{**defaults, **options})
    except ValueError as e:
        if not defaults:
            raise
        raise ValueError(f"{e} (Options for {url} came from {source}.)") from e


def known_schemes():
    """The registered URL schemes, sorted."""
    with _LOCK:
        return sorted(_REGISTRY)


def _uploader_class(scheme, url):
    with _LOCK:
        entry = _REGISTRY.get(scheme)
    if entry is None:
        shown = f"`{scheme}`" if scheme else "none"
        raise ValueError(
            f"Unknown mirror URL scheme {shown} in {url!r}. Known schemes: "
            f"{', '.join(known_schemes())}. Register another with "
            "keras_ckpt.register_uploader()."
        )
    if not isinstance(entry, str):
        return entry
    module_name, _, class_name = entry.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        missing = _missing_dependency(scheme, url, e)
        if missing is None:
            raise
        raise missing from e
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Store)):
        raise ValueError(
            f"The uploader registered for scheme `{scheme}` ({entry}) is not "
            "a keras_ckpt.store.Store subclass."
        )
    return cls


def _missing_dependency(scheme, url, error):
    """A MissingDependencyError if `error` is a known SDK failing to
    import, else None."""
    if scheme not in _EXTRAS:
        return None
    modules, extra = _EXTRAS[scheme]
    missing = (getattr(error, "name", None) or "").split(".")[0]
    if missing not in modules:
        return None
    return MissingDependencyError(
        f"Using {url!r} needs the `{extra}` extra, which is not installed "
        f"(cannot import {error.name}). Install it with:\n"
        f"    pip install 'keras-ckpt[{extra}]'"
    )


def _describe(entry):
    if isinstance(entry, str):
        return entry
    return f"{entry.__module__}:{entry.__qualname__}"
