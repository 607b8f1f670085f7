"""`gs://` mirror through google-cloud-storage."""

import os
import threading

import google.api_core.exceptions as api_exceptions
import google.auth.exceptions as auth_exceptions
import requests.exceptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from google.cloud.storage.retry import DEFAULT_RETRY

from keras_ckpt.store import base
from keras_ckpt.store import options as upload_options_lib

# Words in a refusal that point at an encryption key or a policy rather
# than at plain IAM.
_POLICY_WORDS = ("kms", "cmek", "encryption", "constraints/")


class GCSStore(base.Store):
    """Mirrors checkpoints to Google Cloud Storage.

    Credentials come from Application Default Credentials: a service account
    key in `GOOGLE_APPLICATION_CREDENTIALS`, `gcloud auth
    application-default login`, or the attached service account on GCE, GKE
    and Vertex AI. With `STORAGE_EMULATOR_HOST` set (fake-gcs-server, the
    GCS emulator) it talks to the emulator with anonymous credentials.
    Files of at least `multipart_threshold` bytes are sent as resumable
    uploads in `chunk_size` pieces (100 MiB by default, the SDK's own: GCS
    takes a resumable upload's chunks one after another, so S3-sized chunks
    made a 1 GB upload 3x slower), so a dropped connection resends one
    chunk, not the file.

    A customer-managed key (CMEK), a storage class, custom metadata and
    requester pays are `GCSUploadOptions`, given as keyword arguments with
    google-cloud-storage's names; every object the library writes carries
    them.

    Args:
        url: str, `"gs://bucket/prefix"`.
        **options: see `UploaderOptions` and `GCSUploadOptions`. For GCS,
            `request_retries`
            bounds the SDK's own retry of a request to about
            `request_retries * timeout` seconds.

    Example:

    ```python
    uploader = keras_ckpt.get_uploader("gs://my-bucket/runs/1")
    uploader.check()
    ```
    """

    default_chunk_size = 100 * 1024 * 1024  # the SDK's own default
    upload_options_class = upload_options_lib.GCSUploadOptions

    def __init__(self, url, options=None, **kwargs):
        super().__init__(url, options, **kwargs)
        self._lock = threading.Lock()
        self._storage_client = None
        self._request_retry = (
            DEFAULT_RETRY.with_timeout(
                self.options.timeout * self.options.request_retries
            ).with_delay(
                initial=min(1.0, self.options.backoff or 1.0),
                maximum=self.options.max_backoff or 1.0,
            )
            if self.options.request_retries
            else None
        )

    def _client(self):
        with self._lock:
            if self._storage_client is None:
                project = os.environ.get("GOOGLE_CLOUD_PROJECT")
                if os.environ.get("STORAGE_EMULATOR_HOST"):
                    self._storage_client = storage.Client(
                        project=project, credentials=AnonymousCredentials()
                    )
                else:
                    # Object operations need no project; None skips the
                    # lookup that fails for credentials without one.
                    self._storage_client = storage.Client(project=project)
            return self._storage_client

    def _bucket(self):
        return self._client().bucket(
            self.bucket, user_project=self.upload_options.user_project
        )

    def _blob(self, name, chunk_size=None, write=False):
        """The blob `name`; with `write`, one that uploads with the upload
        options (key, class, metadata)."""
        if not write:
            return self._bucket().blob(self._key(name), chunk_size=chunk_size)
        options = self.upload_options
        blob = self._bucket().blob(
            self._key(name), chunk_size=chunk_size,
            kms_key_name=options.kms_key_name,
        )
        if options.storage_class:
            blob.storage_class = options.storage_class
        if options.metadata:
            blob.metadata = options.metadata
        return blob

    def _upload_file(self, local_path, name, progress=None):
        size = os.path.getsize(local_path)
        chunked = size >= self.options.multipart_threshold
        blob = self._blob(
            name, self.chunk_size if chunked else None, write=True
        )
        blob.upload_from_filename(
            local_path, timeout=self.options.timeout, retry=self._request_retry
        )
        if progress is not None:
            progress(size)

    def _download_file(self, name, local_path, progress=None):
        try:
            self._blob(name).download_to_filename(
                local_path,
                timeout=self.options.timeout,
                retry=self._request_retry,
            )
        except api_exceptions.NotFound as e:
            raise FileNotFoundError(self._url_of(name)) from e
        if progress is not None:
            progress(os.path.getsize(local_path))

    def _list(self):
        prefix = f"{self.prefix}/" if self.prefix else ""
        blobs = self._client().list_blobs(
            self._bucket(), prefix=prefix, timeout=self.options.timeout,
            retry=self._request_retry,
        )
        return {blob.name[len(prefix):]: int(blob.size) for blob in blobs}

    def _delete(self, name):
        try:
            self._blob(name).delete(
                timeout=self.options.timeout, retry=self._request_retry
            )
        except api_exceptions.NotFound:
            pass

    def _read_bytes(self, name):
        try:
            return self._blob(name).download_as_bytes(
                timeout=self.options.timeout, retry=self._request_retry
            )
        except api_exceptions.NotFound:
            return None

    def _write_bytes(self, name, data, if_absent=False):
        try:
            # ifGenerationMatch=0: create only if no live object exists.
            self._blob(name, write=True).upload_from_string(
                data,
                if_generation_match=0 if if_absent else None,
                timeout=self.options.timeout,
                retry=self._request_retry,
            )
        except api_exceptions.PreconditionFailed:
            if if_absent:
                return False
            raise
        return True

    def _read_versioned(self, name):
        blob = self._client().bucket(self.bucket).get_blob(
            self._key(name), timeout=self.options.timeout,
            retry=self._request_retry,
        )
        if blob is None:
            return None, None
        try:
            data = blob.download_as_bytes(
                if_generation_match=blob.generation,
                timeout=self.options.timeout, retry=self._request_retry,
            )
        except (api_exceptions.NotFound, api_exceptions.PreconditionFailed):
            # Replaced or deleted since: report the version read, which a
            # conditional write then finds stale.
            return b"", blob.generation
        return data, blob.generation

    def _write_if(self, name, data, version):
        # ifGenerationMatch: 0 creates, <generation> replaces only that one.
        try:
            self._blob(name, write=True).upload_from_string(
                data, if_generation_match=0 if version is None else version,
                timeout=self.options.timeout, retry=self._request_retry,
            )
        except api_exceptions.PreconditionFailed:
            return False
        return True
    def _archive_file(self, name, storage_class):
        current = self._blob(name)
        current.reload(timeout=self.options.timeout, retry=self._request_retry)
        if current.storage_class == storage_class:
            return
        # A rewrite onto itself: the destination blob carries the key and
        # the metadata, so the archived object keeps them.
        self._blob(name, write=True).update_storage_class(
            storage_class, timeout=self.options.timeout,
            retry=self._request_retry,
        )

    def _probe(self):
        blobs = self._client().list_blobs(
            self._bucket(),
            prefix=f"{self.prefix}/" if self.prefix else "",
            max_results=1,
            timeout=self.options.check_timeout,
            retry=None,
        )
        list(blobs)

    def _error_kind(self, exc):
        if isinstance(exc, auth_exceptions.DefaultCredentialsError):
            return base.NO_CREDENTIALS
        if isinstance(exc, auth_exceptions.RefreshError):
            return base.BAD_CREDENTIALS
        if isinstance(exc, auth_exceptions.TransportError):
            return base.TRANSIENT
        if isinstance(exc, api_exceptions.NotFound):
            # Object-level 404s are handled by the primitives themselves.
            return base.NO_BUCKET
        if isinstance(exc, api_exceptions.Unauthorized):
            return base.BAD_CREDENTIALS
        if isinstance(
            exc,
            (api_exceptions.Forbidden, api_exceptions.BadRequest,
             api_exceptions.PreconditionFailed),
        ) and any(w in str(exc.message).lower() for w in _POLICY_WORDS):
            return base.REFUSED
        if isinstance(exc, api_exceptions.Forbidden):
            return base.DENIED
        if isinstance(exc, api_exceptions.GoogleAPICallError):
            code = exc.code or 0
            return base.TRANSIENT if code in (408, 429) or code >= 500 else None
        if isinstance(
            exc,
            (
                requests.exceptions.ConnectionError,
                requests.exceptions.Timeout,
                requests.exceptions.ChunkedEncodingError,
            ),
        ):
            return base.TRANSIENT
        status = getattr(getattr(exc, "response", None), "status_code", 0)
        if type(exc).__name__ == "DataCorruption" or (
            type(exc).__name__ == "InvalidResponse"
            and (status in (408, 429) or status >= 500)
        ):
            return base.TRANSIENT
        return super()._error_kind(exc)

    def _hint(self, kind):
        if kind == base.NO_BUCKET:
            return (
                f"The bucket `{self.bucket}` does not exist. Create it "
                f"(`gcloud storage buckets create gs://{self.bucket}`) or "
                "correct the mirror URL."
            )
        if kind == base.NO_CREDENTIALS:
            return (
                "No Google Cloud credentials were found. Run `gcloud auth "
                "application-default login`, set GOOGLE_APPLICATION_CREDENTIALS"
                " to a service account key file, or run with an attached "
                "service account."
            )
        if kind == base.BAD_CREDENTIALS:
            return (
                "GCS rejected the Google Cloud credentials; refresh them "
                "(`gcloud auth application-default login`) or check the "
                "service account key."
            )
        if kind == base.REFUSED:
            return (
                f"GCS refused the request to bucket `{self.bucket}`: a "
                "bucket or organization policy or a Cloud KMS key "
                "permission refused it. Upload options in use: "
                f"{upload_options_lib.described(self.upload_options)}. If "
                "the bucket or organization requires a customer-managed key "
                '(CMEK), set kms_key_name="projects/P/locations/L/keyRings/'
                'R/cryptoKeys/K"; the project\'s Cloud Storage service agent '
                "(service-<project number>@gs-project-accounts.iam."
                "gserviceaccount.com) needs roles/cloudkms."
                "cryptoKeyEncrypterDecrypter on that key. Pass options to "
                "keras_ckpt.get_uploader(url, ...), as `--upload-option "
                f"KEY=VALUE` or in {upload_options_lib.ENV}. Nothing was "
                "deleted: the local checkpoints are intact."
            )
        if kind == base.DENIED:
            return (
                f"Access to bucket `{self.bucket}` was denied. Grant the "
                "account roles/storage.objectAdmin on the bucket (or "
                "storage.objects.list, .get, .create and .delete)."
            )
        return super()._hint(kind)
