"""`s3://` mirror through boto3 (AWS S3 and S3-compatible stores)."""

import os
import threading

import boto3
import botocore.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from keras_ckpt.store import base
from keras_ckpt.store import options as upload_options_lib

_TRANSIENT_CODES = {
    "InternalError", "ServiceUnavailable", "SlowDown", "Throttling",
    "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
    "ConditionalRequestConflict", "OperationAborted", "503", "500",
}
_BAD_CREDENTIAL_CODES = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
    "InvalidToken", "TokenRefreshRequired", "AuthorizationHeaderMalformed",
}
_DENIED_CODES = {"AccessDenied", "AllAccessDisabled", "AccountProblem", "403"}
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
# An object in GLACIER / DEEP_ARCHIVE that has not been restored.
_ARCHIVED = "archived"
# Requests that create an object: they carry the write options.
_WRITE_OPERATIONS = {"PutObject", "CreateMultipartUpload", "CopyObject"}
# Requests that a bucket policy or a KMS key can refuse while writing.
_REFUSABLE_OPERATIONS = _WRITE_OPERATIONS | {
    "UploadPart", "UploadPartCopy", "CompleteMultipartUpload",
}


class S3Store(base.Store):
    """Mirrors checkpoints to Amazon S3 or an S3-compatible store.

    Credentials, region and endpoint come from boto3's standard chain:
    `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, the shared
    config files, SSO, container and instance roles; `AWS_ENDPOINT_URL_S3`
    (or `AWS_ENDPOINT_URL`) points it at MinIO, Ceph, R2 and other
    S3-compatible stores. Large files use boto3's managed multipart transfer
    with `max_concurrency` threads.

    Encryption, storage class, tags, ACL, `ExpectedBucketOwner` and
    requester pays are `S3UploadOptions`, given as keyword arguments with
    boto3's own names; every object the library writes carries them.

    Args:
        url: str, `"s3://bucket/prefix"`.
        **options: see `UploaderOptions` and `S3UploadOptions`.

    Example:

    ```python
    uploader = keras_ckpt.get_uploader(
        "s3://my-bucket/runs/1", max_concurrency=16,
        ServerSideEncryption="aws:kms", SSEKMSKeyId="alias/checkpoints")
    uploader.check()
    ```
    """

    upload_options_class = upload_options_lib.S3UploadOptions

    def __init__(self, url, options=None, **kwargs):
        super().__init__(url, options, **kwargs)
        self._lock = threading.Lock()
        self._clients = {}

    def _client(self, probe=False):
        # boto3 clients are thread-safe once created; creating them is not.
        with self._lock:
            client = self._clients.get(probe)
            if client is None:
                timeout = (
                    self.options.check_timeout if probe else self.options.timeout
                )
                attempts = 1 if probe else 1 + self.options.request_retries
                config = Config(
                    connect_timeout=timeout,
                    read_timeout=timeout,
                    retries={"mode": "standard", "total_max_attempts": attempts},
                    max_pool_connections=max(10, 2 * self.options.max_concurrency),
                )
                client = boto3.session.Session().client("s3", config=config)
                # One hook gives every request its options (upload_file's
                # ExtraArgs cannot carry BucketKeyEnabled, and multipart
                # parts, listings and deletes need ExpectedBucketOwner and
                # RequestPayer too).
                client.meta.events.register(
                    "before-parameter-build.s3", self._add_options
                )
                self._clients[probe] = client
            return client

    def _add_options(self, params, model, **_):
        members = model.input_shape.members if model.input_shape else {}
        extra = self.upload_options.request_args()
        if model.name in _WRITE_OPERATIONS:
            extra.update(self.upload_options.write_args())
            if model.name == "CopyObject":
                # A copy keeps the source's metadata and tags unless told
                # to replace them with the (same) configured ones.
                if "Metadata" in extra:
                    params.setdefault("MetadataDirective", "REPLACE")
                if "Tagging" in extra:
                    params.setdefault("TaggingDirective", "REPLACE")
        for key, value in extra.items():
            if key in members:
                params.setdefault(key, value)

    def _transfer_config(self):
        return TransferConfig(
            multipart_threshold=self.options.multipart_threshold,
            multipart_chunksize=self.chunk_size,
            max_concurrency=self.options.max_concurrency,
            use_threads=True,
        )

    def _upload_file(self, local_path, name, progress=None):
        self._client().upload_file(
            local_path, self.bucket, self._key(name),
            Config=self._transfer_config(), Callback=progress,
        )

    def _download_file(self, name, local_path, progress=None):
        try:
            self._client().download_file(
                self.bucket, self._key(name), local_path,
                Config=self._transfer_config(), Callback=progress,
            )
        except botocore.exceptions.ClientError as e:
            if _code(e) in _NOT_FOUND_CODES:
                raise FileNotFoundError(self._url_of(name)) from e
            raise

    def _list(self):
        prefix = f"{self.prefix}/" if self.prefix else ""
        listing = {}
        paginator = self._client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", ()):
                listing[item["Key"][len(prefix):]] = int(item["Size"])
        return listing

    def _delete(self, name):
        # S3 DeleteObject succeeds whether or not the key exists.
        self._client().delete_object(Bucket=self.bucket, Key=self._key(name))

    def _read_bytes(self, name):
        # The same GetObject; the ETag comes with it.
        return self._read_versioned(name)[0]

    def _write_bytes(self, name, data, if_absent=False):
        extra = {"IfNoneMatch": "*"} if if_absent else {}
        try:
            self._client().put_object(
                Bucket=self.bucket, Key=self._key(name), Body=data, **extra
            )
        except botocore.exceptions.ClientError as e:
            if if_absent and _code(e) in ("PreconditionFailed", "412"):
                return False
            raise
        return True

    def _read_versioned(self, name):
        try:
            response = self._client().get_object(
                Bucket=self.bucket, Key=self._key(name)
            )
        except botocore.exceptions.ClientError as e:
            if _code(e) in _NOT_FOUND_CODES:
                return None, None
            raise
        with response["Body"] as body:
            return body.read(), response["ETag"]

    def _write_if(self, name, data, version):
        # S3 conditional writes: If-None-Match: * creates, If-Match: <ETag>
        # replaces only the version that was read.
        extra = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        try:
            self._client().put_object(
                Bucket=self.bucket, Key=self._key(name), Body=data, **extra
            )
        except botocore.exceptions.ClientError as e:
            if _code(e) in ("PreconditionFailed", "412", "NoSuchKey",
                            "ConditionalRequestConflict", "409"):
                return False
            raise
        return True
    def _archive_file(self, name, storage_class):
        client, key = self._client(), self._key(name)
        head = client.head_object(Bucket=self.bucket, Key=key)
        if head.get("StorageClass", "STANDARD") == storage_class:
            return
        # A managed copy onto itself (multipart above the threshold, so
        # files over 5 GB move too); `_add_options` re-applies encryption,
        # tags and metadata, which a copy would otherwise not keep.
        client.copy(
            {"Bucket": self.bucket, "Key": key}, self.bucket, key,
            ExtraArgs={"StorageClass": storage_class},
            Config=self._transfer_config(),
        )

    def _probe(self):
        self._client(probe=True).list_objects_v2(
            Bucket=self.bucket,
            Prefix=f"{self.prefix}/" if self.prefix else "",
            MaxKeys=1,
        )

    def _error_kind(self, exc):
        if isinstance(
            exc,
            (
                botocore.exceptions.NoCredentialsError,
                botocore.exceptions.PartialCredentialsError,
            ),
        ):
            return base.NO_CREDENTIALS
        if isinstance(
            exc,
            (
                botocore.exceptions.HTTPClientError,  # connection, timeouts
                botocore.exceptions.ResponseStreamingError,
                botocore.exceptions.IncompleteReadError,
                botocore.exceptions.ConnectionError,  # incl. connect timeouts
            ),
        ):
            return base.TRANSIENT
        if isinstance(exc, botocore.exceptions.ClientError):
            code = _code(exc)
            status = exc.response.get("ResponseMetadata", {}).get(
                "HTTPStatusCode", 0
            )
            if code == "NoSuchBucket":
                return base.NO_BUCKET
            if code in _BAD_CREDENTIAL_CODES:
                return base.BAD_CREDENTIALS
            if code == "InvalidObjectState":  # a 403 too
                return _ARCHIVED
            message = str(exc.response.get("Error", {}).get("Message", ""))
            if code.startswith("KMS.") or "kms:" in message.lower() or (
                (code in _DENIED_CODES or status == 403)
                and getattr(exc, "operation_name", "") in _REFUSABLE_OPERATIONS
            ):
                return base.REFUSED
            if code in _DENIED_CODES or status == 403:
                return base.DENIED
            if code in _NOT_FOUND_CODES:
                return base.NOT_FOUND
            if code in _TRANSIENT_CODES or status >= 500 or status == 429:
                return base.TRANSIENT
            return None
        return super()._error_kind(exc)

    def _hint(self, kind):
        if kind == base.NO_BUCKET:
            return (
                f"The bucket `{self.bucket}` does not exist. Create it "
                f"(`aws s3 mb s3://{self.bucket}`) or correct the mirror URL."
            )
        if kind == base.NO_CREDENTIALS:
            return (
                f"No AWS credentials were found for bucket `{self.bucket}`. "
                "Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                "AWS_PROFILE, or run with an IAM role."
            )
        if kind == base.BAD_CREDENTIALS:
            return (
                f"S3 rejected the AWS credentials for bucket `{self.bucket}`; "
                "check that they are valid and not expired."
            )
        if kind == base.DENIED:
            return (
                f"Access to bucket `{self.bucket}` was denied. The credentials"
                " need s3:ListBucket on the bucket and s3:GetObject, "
                "s3:PutObject, s3:DeleteObject (and s3:AbortMultipartUpload) "
                f"on {self.bucket}/{self.prefix}/*."
            )
        if kind == base.REFUSED:
            return self._refused_hint()
        if kind == _ARCHIVED:
            return (
                "The object is in an archive storage class (GLACIER or "
                "DEEP_ARCHIVE, e.g. by ArchiveStorageClass) and must be "
                "restored first: `aws s3api restore-object --bucket "
                f"{self.bucket} --key <key> --restore-request Days=1` for "
                "its data and index files, then retry once it is restored, "
                "or use a newer checkpoint."
            )
        if kind == base.TRANSIENT:
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
                "AWS_ENDPOINT_URL"
            )
            where = (f" (endpoint {base.redact(endpoint)})" if endpoint
                     else "")
            return (
                f"S3{where} kept failing or was unreachable; check the network"
                " and endpoint, or raise the `retries` / `timeout` options."
            )
        return super()._hint(kind)

    def _refused_hint(self):
        options = self.upload_options
        if options.ServerSideEncryption in ("aws:kms", "aws:kms:dsse"):
            key = options.SSEKMSKeyId or "the account's aws/s3 key"
            fix = (
                f"Check that the bucket policy accepts this key ({key}) and "
                "that the credentials have kms:GenerateDataKey and "
                "kms:Decrypt on it (the key policy must allow them too)."
            )
        else:
            fix = (
                "If the bucket policy requires SSE-KMS, set "
                'ServerSideEncryption="aws:kms" and SSEKMSKeyId="<key ARN>" '
                "(the credentials need kms:GenerateDataKey and kms:Decrypt "
                'on the key); if it requires SSE-S3, ServerSideEncryption='
                '"AES256".'
            )
        extra = []
        if options.Tagging:
            extra.append("s3:PutObjectTagging (for Tagging)")
        if options.ACL:
            extra.append("s3:PutObjectAcl (for ACL)")
        needs = f" and {', '.join(extra)}" if extra else ""
        return (
            f"S3 refused the request to bucket `{self.bucket}`: a bucket "
            "policy or a KMS key permission refused it (or the credentials "
            f"lack s3:PutObject{needs}). Upload options in "
            f"use: {upload_options_lib.described(options)}. {fix} Pass them "
            "to keras_ckpt.get_uploader(url, ...), as `--upload-option "
            f"KEY=VALUE` or in {upload_options_lib.ENV}. Nothing was deleted:"
            " the local checkpoints are intact."
        )


def _code(error):
    return str(error.response.get("Error", {}).get("Code", ""))

