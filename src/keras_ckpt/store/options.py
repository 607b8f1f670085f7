"""Upload options: what each store is told about every object keras_ckpt writes.

Companies configure buckets with encryption keys, storage classes, tags and
policies that refuse an upload lacking them. Each store has one frozen
dataclass of such options, with the SDK's own names, validated when it is
built:

- `S3UploadOptions`: `ServerSideEncryption`, `SSEKMSKeyId`,
  `BucketKeyEnabled`, `StorageClass`, `Tagging`, `Metadata`, `ACL`,
  `ExpectedBucketOwner`, `RequestPayer`, `ArchiveStorageClass`;
- `GCSUploadOptions`: `kms_key_name`, `storage_class`, `metadata`,
  `user_project`, `archive_storage_class`;
- `AzureUploadOptions`: `encryption_scope`, `standard_blob_tier`, `tags`,
  `metadata`, `archive_blob_tier`.

They are given as keyword arguments of `keras_ckpt.get_uploader(url,
**options)` (so `Checkpoint(mirror=keras_ckpt.get_uploader(url, ...))`), by
the CLI's repeated `--upload-option KEY=VALUE`, or by the environment
variable `KERAS_CKPT_UPLOAD_OPTIONS`, which `get_uploader` reads (this module
is the one place that parses both). This module imports no cloud SDK.
"""

import contextlib
import dataclasses
import difflib
import json
import os
import re
import urllib.parse

from keras_ckpt import _args

#: Environment variable with options for every uploader `get_uploader`
#: builds: a JSON object, or `KEY=VALUE` entries separated by `;` or
#: newlines.
ENV = "KERAS_CKPT_UPLOAD_OPTIONS"

# Options given on the command line (`--upload-option`), set by the CLI for
# the duration of one command; they take precedence over the environment.
_command_line = {}

_S3_SSE = ("AES256", "aws:kms", "aws:kms:dsse")
_S3_CLASSES = (
    "STANDARD", "REDUCED_REDUNDANCY", "STANDARD_IA", "ONEZONE_IA",
    "INTELLIGENT_TIERING", "GLACIER", "DEEP_ARCHIVE", "OUTPOSTS",
    "GLACIER_IR", "SNOW", "EXPRESS_ONEZONE",
)
# Objects in these classes cannot be read before a restore request, which
# takes hours: fine for archived data, never for what resume must read.
_S3_OFFLINE = ("GLACIER", "DEEP_ARCHIVE")
_S3_ACLS = (
    "private", "public-read", "public-read-write", "authenticated-read",
    "aws-exec-read", "bucket-owner-read", "bucket-owner-full-control",
)
_GCS_CLASSES = ("STANDARD", "NEARLINE", "COLDLINE", "ARCHIVE")
_GCS_KMS_RE = re.compile(
    r"^projects/[^/]+/locations/[^/]+/keyRings/[^/]+/cryptoKeys/[^/]+"
    r"(/cryptoKeyVersions/[^/]+)?$"
)
_AZURE_TIERS = ("Hot", "Cool", "Cold", "Archive")
_AZURE_OFFLINE = ("Archive",)


_invalid = _args.invalid


def _check_choice(name, value, choices):
    if value is not None and value not in choices:
        lowered = {c.lower(): c for c in choices}
        close = difflib.get_close_matches(str(value).lower(), lowered, n=1)
        hint = f" Did you mean {lowered[close[0]]!r}?" if close else ""
        raise ValueError(
            f"Invalid value for argument `{name}`. Received: {name}={value!r}."
            f" Expected one of {', '.join(map(repr, choices))}.{hint}"
        )


def _check_text(name, value):
    if value is not None and (not isinstance(value, str) or not value.strip()):
        _invalid(name, value, "a non-empty string")


def _check_mapping(instance, name, max_items=None, max_key=None,
                   max_value=None):
    """Checks a `{str: str}` option and stores a copy of it."""
    value = getattr(instance, name)
    if value is None:
        return
    if isinstance(value, str):  # "k=v&k2=v2", S3's own Tagging syntax
        value = dict(urllib.parse.parse_qsl(value, keep_blank_values=True))
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and k and isinstance(v, str)
        for k, v in value.items()
    ):
        _invalid(name, getattr(instance, name),
                 'a dict of strings such as {"team": "ml"}')
    if max_items is not None and len(value) > max_items:
        _invalid(name, value, f"at most {max_items} entries")
    for key, item in value.items():
        if (max_key and len(key) > max_key) or (
                max_value and len(item) > max_value):
            _invalid(
                name, value,
                f"keys of at most {max_key} and values of at most "
                f"{max_value} characters",
            )
    object.__setattr__(instance, name, dict(value))


@dataclasses.dataclass(frozen=True)
class S3UploadOptions:
    """How every object written to `s3://` is stored: encryption, class, tags.

    Every field is the name boto3 gives the same parameter; each applies to
    every object keras_ckpt writes (data, index, manifest, pointer and any
    small marker object) with `PutObject` or a multipart upload.
    `ExpectedBucketOwner` and `RequestPayer` go with every request (reads,
    listings and deletes too).

    Args:
        ServerSideEncryption: str or None, `"AES256"` (SSE-S3), `"aws:kms"`
            (SSE-KMS) or `"aws:kms:dsse"` (dual-layer SSE-KMS). Defaults to
            None: the bucket's default encryption.
        SSEKMSKeyId: str or None, the KMS key (id, ARN or alias ARN) for
            `"aws:kms"` / `"aws:kms:dsse"`. Defaults to None: the account's
            `aws/s3` key.
        BucketKeyEnabled: bool or None, use an S3 Bucket Key for SSE-KMS
            (fewer KMS requests). Defaults to None: the bucket's setting.
        StorageClass: str or None, e.g. `"STANDARD_IA"`,
            `"INTELLIGENT_TIERING"`, `"GLACIER_IR"`. Not `"GLACIER"` or
            `"DEEP_ARCHIVE"`: resume could not read them. Defaults to None
            (`"STANDARD"`).
        Tagging: dict or None, object tags `{"key": "value"}` (at most 10),
            e.g. for lifecycle rules. `"k=v&k2=v2"` is accepted too.
            Defaults to None.
        Metadata: dict or None, user metadata (`x-amz-meta-*`). Defaults to
            None.
        ACL: str or None, a canned ACL such as `"bucket-owner-full-control"`
            (for buckets owned by another account). Defaults to None.
        ExpectedBucketOwner: str or None, the 12-digit account id that must
            own the bucket; requests to a bucket owned by anyone else fail.
            Defaults to None.
        RequestPayer: str or None, `"requester"` for requester-pays buckets.
            Defaults to None.
        ArchiveStorageClass: str or None, the class that the data and index
            files of checkpoints kept only by `keep_every_n_hours` move to
            once they become archives, e.g. `"GLACIER_IR"`, `"GLACIER"` or
            `"DEEP_ARCHIVE"` (those two need `aws s3api restore-object`
            before a restore). Defaults to None: archives stay where they
            are.

    Example:

    ```python
    mirror = keras_ckpt.get_uploader(
        "s3://my-bucket/run-1", ServerSideEncryption="aws:kms",
        SSEKMSKeyId="arn:aws:kms:us-east-1:111122223333:key/1234abcd-...",
        Tagging={"project": "llm"}, ArchiveStorageClass="GLACIER_IR")
    ```
    """

    ServerSideEncryption: str = None
    SSEKMSKeyId: str = None
    BucketKeyEnabled: bool = None
    StorageClass: str = None
    Tagging: dict = None
    Metadata: dict = None
    ACL: str = None
    ExpectedBucketOwner: str = None
    RequestPayer: str = None
    ArchiveStorageClass: str = None

    def __post_init__(self):
        _check_choice("ServerSideEncryption", self.ServerSideEncryption,
                      _S3_SSE)
        _check_text("SSEKMSKeyId", self.SSEKMSKeyId)
        kms = self.ServerSideEncryption in ("aws:kms", "aws:kms:dsse")
        if self.SSEKMSKeyId is not None and not kms:
            _invalid(
                "SSEKMSKeyId", self.SSEKMSKeyId,
                'to go with ServerSideEncryption="aws:kms" or '
                f'"aws:kms:dsse" (ServerSideEncryption is '
                f"{self.ServerSideEncryption!r})",
            )
        if self.BucketKeyEnabled is not None and not isinstance(
                self.BucketKeyEnabled, bool):
            _invalid("BucketKeyEnabled", self.BucketKeyEnabled,
                     "True, False or None")
        if self.BucketKeyEnabled and not kms:
            _invalid("BucketKeyEnabled", self.BucketKeyEnabled,
                     'to go with ServerSideEncryption="aws:kms"')
        _check_choice("StorageClass", self.StorageClass, _S3_CLASSES)
        if self.StorageClass in _S3_OFFLINE:
            _invalid(
                "StorageClass", self.StorageClass,
                "a class whose objects can be read at once (GLACIER and "
                "DEEP_ARCHIVE need a restore request, so resume would fail);"
                " use ArchiveStorageClass to send archived checkpoints there",
            )
        _check_choice("ArchiveStorageClass", self.ArchiveStorageClass,
                      _S3_CLASSES)
        _check_mapping(self, "Tagging", max_items=10, max_key=128,
                       max_value=256)
        _check_mapping(self, "Metadata")
        _check_choice("ACL", self.ACL, _S3_ACLS)
        if self.ExpectedBucketOwner is not None and not re.fullmatch(
                r"\d{12}", str(self.ExpectedBucketOwner)):
            _invalid("ExpectedBucketOwner", self.ExpectedBucketOwner,
                     "a 12-digit AWS account id")
        _check_choice("RequestPayer", self.RequestPayer, ("requester",))

    def write_args(self):
        """boto3 parameters of every request that creates an object."""
        args = {
            "ServerSideEncryption": self.ServerSideEncryption,
            "SSEKMSKeyId": self.SSEKMSKeyId,
            "BucketKeyEnabled": self.BucketKeyEnabled,
            "StorageClass": self.StorageClass,
            "Tagging": (urllib.parse.urlencode(self.Tagging)
                        if self.Tagging else None),
            "Metadata": self.Metadata or None,
            "ACL": self.ACL,
        }
        return {k: v for k, v in args.items() if v is not None}

    def request_args(self):
        """boto3 parameters of every request (reads and deletes too)."""
        args = {"ExpectedBucketOwner": self.ExpectedBucketOwner,
                "RequestPayer": self.RequestPayer}
        return {k: v for k, v in args.items() if v is not None}

    @property
    def archive_class(self):
        return self.ArchiveStorageClass


@dataclasses.dataclass(frozen=True)
class GCSUploadOptions:
    """How every object written to `gs://` is stored: key, class, metadata.

    Field names are google-cloud-storage's. Each applies to every object
    keras_ckpt writes (data, index, manifest, pointer, markers).

    Args:
        kms_key_name: str or None, a Cloud KMS key for customer-managed
            encryption (CMEK), `"projects/P/locations/L/keyRings/R/
            cryptoKeys/K"`. Defaults to None: the bucket's default key.
        storage_class: str or None, `"STANDARD"`, `"NEARLINE"`,
            `"COLDLINE"` or `"ARCHIVE"`. Defaults to None: the bucket's
            default class.
        metadata: dict or None, custom metadata `{"key": "value"}`.
            Defaults to None.
        user_project: str or None, the project billed for requests to a
            requester-pays bucket (every request carries it). Defaults to
            None.
        archive_storage_class: str or None, the class that the data and
            index files of checkpoints kept only by `keep_every_n_hours` are
            rewritten to once they become archives, e.g. `"ARCHIVE"`.
            Defaults to None.

    Example:

    ```python
    mirror = keras_ckpt.get_uploader(
        "gs://my-bucket/run-1",
        kms_key_name="projects/p/locations/us/keyRings/ml/cryptoKeys/ckpt",
        archive_storage_class="ARCHIVE")
    ```
    """

    kms_key_name: str = None
    storage_class: str = None
    metadata: dict = None
    user_project: str = None
    archive_storage_class: str = None

    def __post_init__(self):
        if self.kms_key_name is not None and not (
                isinstance(self.kms_key_name, str)
                and _GCS_KMS_RE.match(self.kms_key_name)):
            _invalid("kms_key_name", self.kms_key_name,
                     '"projects/P/locations/L/keyRings/R/cryptoKeys/K"')
        _check_choice("storage_class", self.storage_class, _GCS_CLASSES)
        _check_choice("archive_storage_class", self.archive_storage_class,
                      _GCS_CLASSES)
        _check_mapping(self, "metadata")
        _check_text("user_project", self.user_project)

    @property
    def archive_class(self):
        return self.archive_storage_class


@dataclasses.dataclass(frozen=True)
class AzureUploadOptions:
    """How every blob written to `az://` is stored: scope, tier, tags.

    Field names are azure-storage-blob's `upload_blob` keyword arguments.
    Each applies to every blob keras_ckpt writes (data, index, manifest,
    pointer, markers).

    Args:
        encryption_scope: str or None, the encryption scope (e.g. one with a
            customer-managed key in Key Vault) that encrypts each blob.
            Defaults to None: the container's default scope.
        standard_blob_tier: str or None, `"Hot"`, `"Cool"` or `"Cold"` (not
            `"Archive"`: resume could not read it). Defaults to None: the
            account's default tier.
        tags: dict or None, blob index tags `{"key": "value"}` (at most
            10), e.g. for lifecycle rules. Defaults to None.
        metadata: dict or None, blob metadata. Defaults to None.
        archive_blob_tier: str or None, the tier that the data and index
            files of checkpoints kept only by `keep_every_n_hours` move to
            once they become archives, e.g. `"Cold"` or `"Archive"` (which
            must be rehydrated before a restore). Defaults to None.

    Example:

    ```python
    mirror = keras_ckpt.get_uploader(
        "az://checkpoints/run-1", encryption_scope="ml-cmk",
        tags={"project": "llm"}, archive_blob_tier="Cold")
    ```
    """

    encryption_scope: str = None
    standard_blob_tier: str = None
    tags: dict = None
    metadata: dict = None
    archive_blob_tier: str = None

    def __post_init__(self):
        _check_text("encryption_scope", self.encryption_scope)
        _check_choice("standard_blob_tier", self.standard_blob_tier,
                      _AZURE_TIERS)
        if self.standard_blob_tier in _AZURE_OFFLINE:
            _invalid(
                "standard_blob_tier", self.standard_blob_tier,
                '"Hot", "Cool" or "Cold" (Archive blobs must be rehydrated '
                "before they can be read, so resume would fail); use "
                "archive_blob_tier to send archived checkpoints there",
            )
        _check_choice("archive_blob_tier", self.archive_blob_tier,
                      _AZURE_TIERS)
        _check_mapping(self, "tags", max_items=10, max_key=128,
                       max_value=256)
        _check_mapping(self, "metadata")

    @property
    def archive_class(self):
        return self.archive_blob_tier


ALL = (S3UploadOptions, GCSUploadOptions, AzureUploadOptions)


def field_names(cls):
    return [f.name for f in dataclasses.fields(cls)] if cls else []


def described(options):
    """`Name=value, ...` of the options that are set, for messages."""
    if options is None:
        return "none"
    shown = [
        f"{f.name}={getattr(options, f.name)!r}"
        for f in dataclasses.fields(options)
        if getattr(options, f.name) is not None
    ]
    return ", ".join(shown) or "none"


# --------------------------------------------------------------------------
# Keyword arguments -> (UploaderOptions, upload options).


def resolve(uploader_cls, options_cls, options, upload_options, kwargs):
    """Splits an `Uploader`'s keyword arguments into its two option objects.

    Args:
        uploader_cls: the `Uploader` subclass being built.
        options_cls: `UploaderOptions`.
        options: an `UploaderOptions` or None.
        upload_options: an instance of `uploader_cls.upload_options_class`
            or None.
        kwargs: dict, the remaining keyword arguments.

    Returns:
        `(options, upload_options)`; `upload_options` is None for a store
        without upload options.
    """
    name = uploader_cls.__name__
    store_cls = uploader_cls.upload_options_class
    general = field_names(options_cls)
    specific = field_names(store_cls)
    unknown = sorted(set(kwargs) - set(general) - set(specific))
    if unknown:
        valid = sorted(general + specific, key=str.lower)
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
            if not close:
                close = [v for v in valid if v.lower() == key.lower()]
            if close:
                hints.append(f"`{key}`: did you mean `{close[0]}`?")
            elif any(key in field_names(c) for c in ALL):
                hints.append(f"`{key}` is an option of another store")
        hint = f" ({'; '.join(hints)})" if hints else ""
        raise ValueError(
            f"Unrecognized keyword arguments passed to {name}: {unknown}"
            f"{hint}. Valid options: {valid}."
        )
    given_general = {k: v for k, v in kwargs.items() if k in general}
    given_specific = {k: v for k, v in kwargs.items() if k in specific}
    if options is not None and given_general:
        raise ValueError(
            f"Pass either `options` or keyword options to {name}, not both. "
            f"Received: options={options!r} and {given_general!r}."
        )
    if options is None:
        options = options_cls(
            **{k: _from_text(options_cls, k, v)
               for k, v in given_general.items()}
        )
    elif not isinstance(options, options_cls):
        _invalid("options", options, "an UploaderOptions instance or None")
    if store_cls is None:
        if upload_options is not None:
            _invalid("upload_options", upload_options,
                     f"None: {name} takes no upload options")
        return options, None
    if upload_options is not None and given_specific:
        raise ValueError(
            f"Pass either `upload_options` or keyword upload options to "
            f"{name}, not both. Received: upload_options={upload_options!r}"
            f" and {given_specific!r}."
        )
    if upload_options is None:
        upload_options = store_cls(
            **{k: _from_text(store_cls, k, v)
               for k, v in given_specific.items()}
        )
    elif not isinstance(upload_options, store_cls):
        _invalid("upload_options", upload_options,
                 f"a {store_cls.__name__} instance or None")
    return options, upload_options


def _from_text(cls, name, value):
    """Converts a string from the CLI or the environment to the field's
    type; other values are left to the dataclass to check."""
    if not isinstance(value, str):
        return value
    kind = {f.name: f.type for f in dataclasses.fields(cls)}.get(name)
    if kind is bool:
        lowered = value.strip().lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        _invalid(name, value, '"true" or "false"')
    if kind is dict and value.lstrip().startswith("{"):
        try:
            return json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            _invalid(name, value, 'a JSON object such as {"team": "ml"}')
    if kind in (int, float):
        try:
            return kind(value) if kind is int else float(value)
        except ValueError:
            _invalid(name, value, f"a number ({kind.__name__})")
    return value


# --------------------------------------------------------------------------
# Text (CLI flag, environment) -> keyword arguments.


def parse_entries(entries, source):
    """Parses `KEY=VALUE` strings into keyword arguments.

    `KEY.SUB=VALUE` sets one entry of a dict option (`Tagging.team=ml`,
    `metadata.owner=me`). Values stay strings; each store converts them.

    Args:
        entries: iterable of str.
        source: str, where they came from, for error messages
            (`"--upload-option"`, `"KERAS_CKPT_UPLOAD_OPTIONS"`).

    Returns:
        dict.

    Raises:
        ValueError: an entry is not `KEY=VALUE`.
    """
    parsed = {}
    for entry in entries:
        key, sep, value = entry.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ValueError(
                f"Invalid value for {source}: {entry!r}. Expected KEY=VALUE,"
                ' e.g. "ServerSideEncryption=aws:kms".'
            )
        if "." in key:
            key, _, sub = key.partition(".")
            if not isinstance(parsed.get(key, {}), dict):
                raise ValueError(
                    f"Invalid value for {source}: {entry!r} sets an entry of "
                    f"`{key}`, which was also given as a whole."
                )
            parsed.setdefault(key, {})[sub] = value
        else:
            parsed[key] = value
    return parsed


def from_environment(environ=None):
    """The options in `KERAS_CKPT_UPLOAD_OPTIONS`, as keyword arguments.

    The variable holds a JSON object (`{"ServerSideEncryption": "aws:kms",
    "Tagging": {"team": "ml"}}`) or `KEY=VALUE` entries separated by `;` or
    newlines (`ServerSideEncryption=aws:kms;Tagging.team=ml`).
    """
    environ = os.environ if environ is None else environ
    text = (environ.get(ENV) or "").strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            reason = ("nested too deeply" if isinstance(e, RecursionError)
                      else str(e))
            raise ValueError(
                f"Invalid value for environment variable {ENV}: {reason}. "
                'Expected a JSON object or "KEY=VALUE;KEY=VALUE".'
            ) from None
        if not isinstance(value, dict):
            raise ValueError(
                f"Invalid value for environment variable {ENV}: {text!r}. "
                'Expected a JSON object or "KEY=VALUE;KEY=VALUE".'
            )
        return value
    entries = [e for e in re.split(r"[;\n]", text) if e.strip()]
    return parse_entries(entries, f"environment variable {ENV}")


@contextlib.contextmanager
def command_line(options):
    """Makes `get_uploader` apply `options` (from `--upload-option`) while
    one CLI command runs."""
    global _command_line
    previous, _command_line = _command_line, dict(options)
    try:
        yield
    finally:
        _command_line = previous


def defaults():
    """Options `get_uploader` applies under explicit keyword arguments:
    the environment, overridden by the command line. Also returns which
    source they came from, for error messages."""
    merged = dict(from_environment())
    sources = [ENV] if merged else []
    if _command_line:
        merged.update(_command_line)
        sources.append("--upload-option")
    return merged, " and ".join(sources)


def known_names(options_cls):
    """Every option name some store accepts, for early CLI checks."""
    names = set(field_names(options_cls))
    for cls in ALL:
        names.update(field_names(cls))
    return sorted(names, key=str.lower)
