"""`az://` mirror through azure-storage-blob."""

import os
import threading

import azure.core.exceptions as azure_exceptions
from azure.core import MatchConditions
from azure.storage.blob import BlobServiceClient
from azure.storage.blob import StandardBlobTier

from keras_ckpt.errors import MissingDependencyError
from keras_ckpt.errors import StorageError
from keras_ckpt.store import base
from keras_ckpt.store import options as upload_options_lib

CONNECTION_STRING_ENV = "AZURE_STORAGE_CONNECTION_STRING"
ACCOUNT_URL_ENV = "AZURE_STORAGE_ACCOUNT_URL"
# A blob in the Archive tier that has not been rehydrated.
_ARCHIVED = "archived"


class AzureStore(base.Store):
    """Mirrors checkpoints to Azure Blob Storage (`az://container/prefix`).

    The storage account comes from the environment, read when the uploader
    is created:

    - `AZURE_STORAGE_CONNECTION_STRING` (account key or SAS; also Azurite),
      or
    - `AZURE_STORAGE_ACCOUNT_URL` (`https://<account>.blob.core.windows.net`)
      with `DefaultAzureCredential`: managed identity, workload identity,
      `AZURE_CLIENT_ID`/`AZURE_TENANT_ID`/`AZURE_CLIENT_SECRET`, `az login`.

    Large files go up as blocks and come down in ranges, `max_concurrency`
    at a time (the SDK's default is one).

    An encryption scope, an access tier, blob index tags and metadata are
    `AzureUploadOptions`, given as keyword arguments with
    azure-storage-blob's names; every blob the library writes carries them.

    Args:
        url: str, `"az://container/prefix"`.
        **options: see `UploaderOptions` and `AzureUploadOptions`.

    Raises:
        StorageError: neither environment variable is set.

    Example:

    ```python
    os.environ["AZURE_STORAGE_ACCOUNT_URL"] = "https://myaccount.blob.core.windows.net"
    uploader = keras_ckpt.get_uploader("az://checkpoints/runs/1")
    uploader.check()
    ```
    """

    bucket_word = "container"
    upload_options_class = upload_options_lib.AzureUploadOptions

    def __init__(self, url, options=None, **kwargs):
        super().__init__(url, options, **kwargs)
        self._connection_string = os.environ.get(CONNECTION_STRING_ENV)
        self._account_url = os.environ.get(ACCOUNT_URL_ENV)
        if not (self._connection_string or self._account_url):
            raise StorageError(
                f"Cannot reach {self.url}: no Azure storage account is "
                f"configured. Set {CONNECTION_STRING_ENV} to the account's "
                f"connection string, or {ACCOUNT_URL_ENV} to "
                "https://<account>.blob.core.windows.net to sign in with "
                "DefaultAzureCredential (managed identity, az login, ...)."
            )
        self._lock = threading.Lock()
        self._container_client = None

    def _container(self):
        with self._lock:
            if self._container_client is None:
                config = dict(
                    retry_total=self.options.request_retries,
                    connection_timeout=self.options.timeout,
                    read_timeout=self.options.timeout,
                    max_single_put_size=self.options.multipart_threshold,
                    max_block_size=self.chunk_size,
                    max_single_get_size=self.options.multipart_threshold,
                    max_chunk_get_size=self.chunk_size,
                )
                if self._connection_string:
                    service = BlobServiceClient.from_connection_string(
                        self._connection_string, **config
                    )
                else:
                    service = BlobServiceClient(
                        self._account_url, credential=_default_credential(),
                        **config,
                    )
                self._container_client = service.get_container_client(
                    self.bucket
                )
            return self._container_client

    def _write_args(self):
        """`upload_blob` keyword arguments of every blob written."""
        options = self.upload_options
        args = {
            "encryption_scope": options.encryption_scope,
            "standard_blob_tier": (
                StandardBlobTier(options.standard_blob_tier)
                if options.standard_blob_tier else None
            ),
            "tags": options.tags or None,
            "metadata": options.metadata or None,
        }
        return {k: v for k, v in args.items() if v is not None}

    def _upload_file(self, local_path, name, progress=None):
        with open(local_path, "rb") as f:
            self._container().upload_blob(
                self._key(name), f, length=os.path.getsize(local_path),
                overwrite=True, max_concurrency=self.options.max_concurrency,
                progress_hook=_increments(progress), **self._write_args(),
            )

    def _download_file(self, name, local_path, progress=None):
        try:
            downloader = self._container().download_blob(
                self._key(name), max_concurrency=self.options.max_concurrency,
                progress_hook=_increments(progress),
            )
            with open(local_path, "wb") as f:
                downloader.readinto(f)
        except azure_exceptions.ResourceNotFoundError as e:
            if _code(e) == "BlobNotFound":
                raise FileNotFoundError(self._url_of(name)) from e
            raise

    def _list(self):
        prefix = f"{self.prefix}/" if self.prefix else ""
        blobs = self._container().list_blobs(
            name_starts_with=prefix or None
        )
        return {blob.name[len(prefix):]: int(blob.size) for blob in blobs}

    def _delete(self, name):
        try:
            self._container().delete_blob(self._key(name))
        except azure_exceptions.ResourceNotFoundError as e:
            if _code(e) != "BlobNotFound":
                raise

    def _read_bytes(self, name):
        # The same download; the ETag comes with it.
        return self._read_versioned(name)[0]

    def _write_bytes(self, name, data, if_absent=False):
        try:
            # overwrite=False sends If-None-Match: *, an atomic create.
            self._container().upload_blob(
                self._key(name), data, overwrite=not if_absent,
                **self._write_args(),
            )
        except azure_exceptions.ResourceExistsError:
            if if_absent:
                return False
            raise
        return True

    def _read_versioned(self, name):
        try:
            downloader = self._container().download_blob(self._key(name))
        except azure_exceptions.ResourceNotFoundError as e:
            if _code(e) == "BlobNotFound":
                return None, None
            raise
        return downloader.readall(), downloader.properties.etag

    def _write_if(self, name, data, version):
        # ETag preconditions: If-None-Match: * creates, If-Match replaces
        # only the version that was read.
        if version is None:
            return self._write_bytes(name, data, if_absent=True)
        try:
            self._container().upload_blob(
                self._key(name), data, overwrite=True, etag=version,
                match_condition=MatchConditions.IfNotModified,
                **self._write_args(),
            )
        except (azure_exceptions.ResourceModifiedError,
                azure_exceptions.ResourceNotFoundError):
            return False
        return True
    def _archive_file(self, name, storage_class):
        blob = self._container().get_blob_client(self._key(name))
        if blob.get_blob_properties().blob_tier == storage_class:
            return
        blob.set_standard_blob_tier(StandardBlobTier(storage_class))

    def _probe(self):
        timeout = self.options.check_timeout
        pages = self._container().list_blobs(
            name_starts_with=f"{self.prefix}/" if self.prefix else None,
            results_per_page=1,
            retry_total=0,
            connection_timeout=timeout,
            read_timeout=timeout,
        ).by_page()
        next(pages, None)

    def _error_kind(self, exc):
        if type(exc).__name__ == "CredentialUnavailableError":
            return base.NO_CREDENTIALS
        if isinstance(exc, azure_exceptions.HttpResponseError) and (
            "EncryptionScope" in _code(exc)
            or _code(exc) == "AuthorizationPermissionMismatch"
        ):
            return base.REFUSED
        if isinstance(exc, azure_exceptions.ClientAuthenticationError):
            # A 403 from the service is a ClientAuthenticationError too.
            code = _code(exc)
            if code in ("AuthenticationFailed", "InvalidAuthenticationInfo"):
                return base.BAD_CREDENTIALS
            if getattr(exc, "status_code", None) in (401, 403):
                return base.DENIED
            return base.BAD_CREDENTIALS
        if isinstance(
            exc,
            (
                azure_exceptions.ServiceRequestError,  # connect failed
                azure_exceptions.ServiceResponseError,  # reply lost/timeout
            ),
        ):
            return base.TRANSIENT
        if isinstance(exc, azure_exceptions.HttpResponseError):
            code = _code(exc)
            status = exc.status_code or 0
            if code == "ContainerNotFound":
                return base.NO_BUCKET
            if code == "BlobArchived":
                return _ARCHIVED
            if code == "BlobNotFound":
                return base.NOT_FOUND
            if code in ("AuthenticationFailed", "InvalidAuthenticationInfo"):
                return base.BAD_CREDENTIALS
            if status in (401, 403):
                return base.DENIED
            if status in (408, 429) or status >= 500:
                return base.TRANSIENT
            return None
        return super()._error_kind(exc)

    def _hint(self, kind):
        if kind == base.NO_BUCKET:
            return (
                f"The container `{self.bucket}` does not exist in this storage"
                f" account. Create it (`az storage container create --name "
                f"{self.bucket}`) or correct the mirror URL."
            )
        if kind == base.NO_CREDENTIALS:
            return (
                "DefaultAzureCredential found no credentials: use a managed "
                "identity, run `az login`, or set "
                f"{CONNECTION_STRING_ENV} instead of {ACCOUNT_URL_ENV}."
            )
        if kind == _ARCHIVED:
            return (
                "The blob is in the Archive tier (e.g. by archive_blob_tier)"
                " and must be rehydrated first: `az storage blob set-tier "
                f"--container-name {self.bucket} --name <blob> --tier Hot "
                "--rehydrate-priority High` for its data and index blobs, "
                "then retry once they are rehydrated (hours), or use a newer "
                "checkpoint."
            )
        if kind == base.REFUSED:
            return (
                f"Azure refused the request to container `{self.bucket}`: "
                "an encryption scope policy or a role assignment refused it."
                " Upload options in use: "
                f"{upload_options_lib.described(self.upload_options)}. If "
                "the container requires an encryption scope (default scope "
                "with override prevented), set encryption_scope to that "
                "scope's name; the scope must exist and be enabled, and its "
                "Key Vault key must grant the storage account's identity "
                "get, wrapKey and unwrapKey. Writing needs the `Storage Blob"
                " Data Contributor` role (`Storage Blob Data Owner` to set "
                "tags). Pass options to keras_ckpt.get_uploader(url, ...), as"
                f" `--upload-option KEY=VALUE` or in {upload_options_lib.ENV}."
                " Nothing was deleted: the local checkpoints are intact."
            )
        if kind in (base.BAD_CREDENTIALS, base.DENIED):
            return (
                f"Azure refused access to container `{self.bucket}`: check the "
                f"account key or SAS in {CONNECTION_STRING_ENV}, or grant the "
                "identity the `Storage Blob Data Contributor` role on the "
                "container or account."
            )
        return super()._hint(kind)


def _default_credential():
    try:
        from azure.identity import DefaultAzureCredential
    except ImportError as e:
        raise MissingDependencyError(
            f"{ACCOUNT_URL_ENV} needs azure-identity (cannot import "
            f"{e.name}). Install it with:\n    pip install 'keras-ckpt[azure]'"
        ) from e
    return DefaultAzureCredential()


def _increments(progress):
    """Turns Azure's `progress_hook(current, total)` into byte increments."""
    if progress is None:
        return None
    done = [0]

    def hook(current, total):
        if current > done[0]:
            progress(current - done[0])
            done[0] = current

    return hook


def _code(exc):
    code = getattr(exc, "error_code", None) or ""
    return str(getattr(code, "value", code))
