"""Upload options (encryption, storage class, tags, metadata) on every object
keras_ckpt writes, against the emulators and the real SDKs.

Where an emulator keeps a setting, the test reads it back from the store.
Where it drops one (fake-gcs-server: `kms_key_name`, and the class of a
rewrite; Azurite: `encryption_scope`), the test reads the request the SDK
really sent through the SDK's own request hook.

The S3 cases run on moto and on SeaweedFS, a real S3 server; a case needing
a feature SeaweedFS lacks is skipped there, naming the feature.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import types

import boto3
import keras
import numpy as np
import pytest

import keras_ckpt
from keras_ckpt import cli
from keras_ckpt.errors import StorageError
from keras_ckpt.store import AzureUploadOptions
from keras_ckpt.store import GCSUploadOptions
from keras_ckpt.store import S3UploadOptions
from keras_ckpt.store import get_uploader
from keras_ckpt.store import options as upload_options_lib
from test_uploaders import FAST
from test_uploaders import write_checkpoint
from test_uploaders import write_pointer

KEY_ARN = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef"
GCS_KEY = "projects/p/locations/us/keyRings/ml/cryptoKeys/ckpt"
S3_OPTIONS = dict(
    ServerSideEncryption="aws:kms", SSEKMSKeyId=KEY_ARN,
    BucketKeyEnabled=True, StorageClass="STANDARD_IA",
    Tagging={"team": "ml", "retention": "short"}, Metadata={"owner": "me"},
)
# Small parts: the data files then go up as real multipart uploads.
MULTIPART = dict(multipart_threshold=1024, chunk_size=5 * 1024 * 1024)
# SeaweedFS's SSE-KMS needs a KMS provider that knows the key; it answers
# 500 InternalError ("KMS is not configured") where AWS would use the key.
NO_KMS = "SeaweedFS has no KMS provider holding the test's key (SSE-KMS)"
# AWS changes an object's class by a CopyObject onto itself with a new
# x-amz-storage-class; SeaweedFS refuses that copy (400 InvalidRequest)
# unless the metadata is replaced too.
NO_CLASS_CHANGE = ("SeaweedFS refuses a CopyObject onto itself that "
                   "changes only the storage class")


@pytest.fixture(params=["s3", "s3-seaweedfs"])
def s3_url(request, monkeypatch):
    """A fresh `s3://` URL on moto (`s3`) or on SeaweedFS."""
    from conftest import _fresh_url

    emulator = request.getfixturevalue(
        {"s3": "moto_server", "s3-seaweedfs": "seaweedfs"}[request.param])
    return _fresh_url(emulator, monkeypatch)


def skip_on_seaweedfs(request, missing):
    """Skips this case on SeaweedFS, which lacks the feature `missing`."""
    if request.node.callspec.params.get("s3_url") == "s3-seaweedfs":
        pytest.skip(missing)


@pytest.fixture(scope="module")
def local_ckpts(tmp_path_factory):
    """ckpt-1 and ckpt-2 (64 KiB of data each) and a pointer; read only."""
    directory = str(tmp_path_factory.mktemp("local"))
    for step in (1, 2):
        write_checkpoint(directory, step, 16 * 1024, seed=step)
    write_pointer(directory, ["ckpt-1", "ckpt-2"])
    return types.SimpleNamespace(dir=directory, names=["ckpt-1", "ckpt-2"])


def s3_client():
    return boto3.client("s3")


def s3_objects(url):
    bucket, _, prefix = url[len("s3://"):].partition("/")
    listing = s3_client().list_objects_v2(Bucket=bucket, Prefix=prefix + "/")
    return bucket, [o["Key"] for o in listing.get("Contents", ())]


def deny_uploads(url):
    """A bucket policy denying every PutObject. moto enforces a policy's
    Deny but ignores its Condition, so this stands for the usual "deny
    PutObject without x-amz-server-side-encryption: aws:kms"."""
    bucket, _ = s3_objects(url)
    s3_client().put_bucket_policy(Bucket=bucket, Policy=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Deny", "Principal": "*",
                       "Action": "s3:PutObject",
                       "Resource": f"arn:aws:s3:::{bucket}/*"}],
    }))


def new_model(hidden=None):
    layers = [keras.layers.Dense(hidden)] if hidden else []
    model = keras.Sequential(
        [keras.Input((4,)), *layers, keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    return model


def train(ckpt, epochs, batch_size=8, hidden=None):
    x = np.random.default_rng(0).random((16, 4), dtype="float32")
    new_model(hidden).fit(x, x[:, :2], epochs=epochs, batch_size=batch_size,
                          callbacks=[ckpt], verbose=0)


WRITES = ("PutObject", "CreateMultipartUpload", "CopyObject")


def record_s3_requests(uploader):
    """`(operation, headers)` of every request, as boto3 really sends them
    (its `before-send` event)."""
    sent = []

    def record(request, event_name, **_):
        sent.append((event_name.rsplit(".", 1)[-1],
                     {k.lower(): v for k, v in request.headers.items()}))

    uploader._client().meta.events.register("before-send.s3", record)
    return sent


def assert_writes_asked_for_bucket_keys(sent):
    writes = [(op, headers) for op, headers in sent if op in WRITES]
    assert {op for op, _ in writes} >= {"PutObject", "CreateMultipartUpload"}
    for operation, headers in writes:
        assert headers.get(
            "x-amz-server-side-encryption-bucket-key-enabled") in (
                b"true", "true"), operation


def assert_s3_objects_carry(url, storage_class="STANDARD_IA", only=None):
    bucket, keys = s3_objects(url)
    names = {k.rsplit("/", 1)[1] for k in keys}
    assert {"checkpoint"} <= names
    assert any(n.endswith(".index") for n in names)
    assert any(n.endswith(".json") for n in names)
    assert any(".data-" in n for n in names)
    for key in keys:
        if only is not None and not only(key):
            continue
        head = s3_client().head_object(Bucket=bucket, Key=key)
        assert head["ServerSideEncryption"] == "aws:kms", key
        assert head["SSEKMSKeyId"] == KEY_ARN, key
        if "-" not in head["ETag"]:
            # moto drops BucketKeyEnabled from multipart uploads (ETag
            # "<md5>-<parts>"); `record_s3_requests` sees the header sent.
            assert head["BucketKeyEnabled"] is True, key
        assert head.get("StorageClass", "STANDARD") == storage_class, key
        assert head["Metadata"] == {"owner": "me"}, key
        tags = s3_client().get_object_tagging(Bucket=bucket, Key=key)
        assert {t["Key"]: t["Value"] for t in tags["TagSet"]} == {
            "team": "ml", "retention": "short"}, key
    return keys


# --- validation at the boundary ---------------------------------------------


def test_unknown_option_lists_valid_ones_with_a_close_match(s3_url):
    with pytest.raises(ValueError) as e:
        get_uploader(s3_url, ServerSideEncyption="aws:kms")
    message = str(e.value)
    assert "`ServerSideEncyption`: did you mean `ServerSideEncryption`?" in (
        message)
    assert "SSEKMSKeyId" in message and "retries" in message


def test_option_of_another_store_is_refused(file_url, gcs_url):
    with pytest.raises(ValueError, match="option of another store"):
        get_uploader(file_url, ServerSideEncryption="AES256")
    with pytest.raises(ValueError, match="`StorageClass`: did you mean "
                                         "`storage_class`"):
        get_uploader(gcs_url, StorageClass="NEARLINE")


@pytest.mark.parametrize("cls, kwargs, match", [
    (S3UploadOptions, dict(ServerSideEncryption="aws:kmz"),
     "Did you mean 'aws:kms'"),
    (S3UploadOptions, dict(SSEKMSKeyId=KEY_ARN),
     'to go with ServerSideEncryption="aws:kms"'),
    (S3UploadOptions, dict(StorageClass="GLACIER"), "resume would fail"),
    (S3UploadOptions, dict(Tagging={str(i): "x" for i in range(11)}),
     "at most 10 entries"),
    (S3UploadOptions, dict(ExpectedBucketOwner="me"), "12-digit"),
    (GCSUploadOptions, dict(kms_key_name="ckpt-key"), "projects/P"),
    (GCSUploadOptions, dict(storage_class="COLD"), "'COLDLINE'"),
    (AzureUploadOptions, dict(standard_blob_tier="Archive"),
     "archive_blob_tier"),
    (AzureUploadOptions, dict(tags={"a": 1}), "dict of strings"),
])
def test_invalid_values_are_refused_in_keras_style(cls, kwargs, match):
    with pytest.raises(ValueError, match="Invalid value for argument") as e:
        cls(**kwargs)
    assert match in str(e.value)


def test_environment_options_fail_the_checkpoint_before_fit(
        s3_url, tmp_path, monkeypatch):
    monkeypatch.setenv(upload_options_lib.ENV, "ServerSideEncryption=KMS")
    with pytest.raises(ValueError) as e:
        keras_ckpt.Checkpoint(directory=str(tmp_path / "c"), mirror=s3_url)
    assert "ServerSideEncryption='KMS'" in str(e.value)
    assert upload_options_lib.ENV in str(e.value)


def test_environment_formats_and_precedence(s3_url, monkeypatch):
    monkeypatch.setenv(
        upload_options_lib.ENV,
        json.dumps({"ServerSideEncryption": "AES256",
                    "Tagging": {"team": "ml"}, "retries": "7"}),
    )
    uploader = get_uploader(s3_url)
    assert uploader.upload_options.Tagging == {"team": "ml"}
    assert uploader.options.retries == 7
    # Explicit arguments win over the environment.
    assert get_uploader(s3_url, ServerSideEncryption="aws:kms")\
        .upload_options.ServerSideEncryption == "aws:kms"
    monkeypatch.setenv(
        upload_options_lib.ENV,
        "StorageClass=ONEZONE_IA; Tagging.team=ml;Tagging.env=dev\n"
        "BucketKeyEnabled=false",
    )
    options = get_uploader(s3_url).upload_options
    assert options.StorageClass == "ONEZONE_IA"
    assert options.Tagging == {"team": "ml", "env": "dev"}
    assert options.BucketKeyEnabled is False
    monkeypatch.setenv(upload_options_lib.ENV, "StorageClass")
    with pytest.raises(ValueError, match="Expected KEY=VALUE"):
        get_uploader(s3_url)


def test_cli_rejects_unknown_option_with_usage_error(
        local_ckpts, s3_url, capsys):
    code = cli.main(["push", local_ckpts.dir, s3_url,
                     "--upload-option", "ServerSideEncription=aws:kms"])
    assert code == 2
    err = capsys.readouterr().err
    assert "Did you mean `ServerSideEncryption`?" in err
    _, keys = s3_objects(s3_url)
    assert keys == []  # nothing was sent


# --- S3 (moto keeps every setting) -------------------------------------------


def test_fit_with_s3_mirror_writes_every_object_with_the_options(
        s3_url, tmp_path, request):
    skip_on_seaweedfs(request, NO_KMS)
    mirror = get_uploader(s3_url, **S3_OPTIONS, **MULTIPART, **FAST)
    sent = record_s3_requests(mirror)
    ckpt = keras_ckpt.Checkpoint(
        directory=str(tmp_path / "ckpt"), mirror=mirror, verbose=0)
    train(ckpt, epochs=2, hidden=256)  # data files > 1024 bytes: multipart
    keys = assert_s3_objects_carry(s3_url)
    assert_writes_asked_for_bucket_keys(sent)
    assert len(keys) >= 4
    # Readable as usual (the uploader reads what it wrote).
    assert get_uploader(s3_url).latest_complete() == ckpt.last_saved.name


def test_push_with_cli_flags_and_environment(local_ckpts, s3_url, monkeypatch,
                                            request):
    skip_on_seaweedfs(request, NO_KMS)
    monkeypatch.setenv(
        upload_options_lib.ENV,
        f"ServerSideEncryption=aws:kms;SSEKMSKeyId={KEY_ARN};"
        "StorageClass=ONEZONE_IA;Metadata.owner=me",
    )
    code = cli.main([
        "push", local_ckpts.dir, s3_url,
        "--upload-option", "StorageClass=STANDARD_IA",  # overrides the env
        "--upload-option", "BucketKeyEnabled=true",
        "--upload-option", "Tagging=team=ml&retention=short",
    ])
    assert code == 0
    keys = assert_s3_objects_carry(s3_url)
    assert len(keys) == 7  # 2 x (data, index, manifest) + pointer


def test_every_request_carries_owner_and_requester_pays(local_ckpts, s3_url,
                                                        tmp_path):
    uploader = get_uploader(s3_url, ExpectedBucketOwner="123456789012",
                            RequestPayer="requester", **MULTIPART)
    sent = record_s3_requests(uploader)
    uploader.push(local_ckpts.dir)
    uploader.pull(str(tmp_path / "pulled"))
    uploader.delete_checkpoint("ckpt-1")
    assert {"PutObject", "CreateMultipartUpload", "UploadPart",
            "ListObjectsV2", "GetObject", "DeleteObject"} <= {
                op for op, _ in sent}
    for operation, headers in sent:
        assert headers.get("x-amz-expected-bucket-owner") in (
            b"123456789012", "123456789012"), operation
        assert headers.get("x-amz-request-payer") in (
            b"requester", "requester"), operation


def test_bucket_policy_refusal_names_the_policy_and_keeps_local_checkpoints(
        s3_url, tmp_path):
    deny_uploads(s3_url)
    directory = str(tmp_path / "ckpt")
    ckpt = keras_ckpt.Checkpoint(
        directory=directory, mirror=get_uploader(s3_url, **FAST), verbose=0)
    with pytest.raises(StorageError) as e:
        train(ckpt, epochs=1)
    message = str(e.value)
    assert "a bucket policy or a KMS key permission refused" in message
    assert 'ServerSideEncryption="aws:kms"' in message
    assert "SSEKMSKeyId" in message
    assert "after" not in message.split(".")[0]  # not retried as transient
    # The writer lease is written to the mirror when fit() starts, so the
    # refusal comes before the first batch, and nothing local is broken.
    assert all(i.complete for i in keras_ckpt.list_checkpoints(directory))


def test_push_refused_by_policy_exits_1_with_the_option_to_set(
        local_ckpts, s3_url, capsys):
    deny_uploads(s3_url)
    code = cli.main(["push", local_ckpts.dir, s3_url,
                     "--upload-option", "ServerSideEncryption=aws:kms"])
    assert code == 1
    err = capsys.readouterr().err
    assert "bucket policy or a KMS key permission refused" in err
    assert "ServerSideEncryption='aws:kms'" in err  # what was in use
    assert "kms:GenerateDataKey" in err


def test_archives_move_to_the_archive_class_keeping_encryption_and_tags(
        s3_url, tmp_path, request):
    skip_on_seaweedfs(request, f"{NO_KMS}; {NO_CLASS_CHANGE}")
    # MULTIPART: the data files move by a multipart copy, the index files
    # (smaller than a part) by CopyObject.
    mirror = get_uploader(s3_url, ArchiveStorageClass="GLACIER_IR",
                          **S3_OPTIONS, **MULTIPART, **FAST)
    sent = record_s3_requests(mirror)
    # Windows of a few microseconds: every checkpoint is an archive once
    # it is no longer the newest.
    ckpt = keras_ckpt.Checkpoint(
        directory=str(tmp_path / "ckpt"), mirror=mirror, max_to_keep=1,
        keep_every_n_hours=1e-9, verbose=0)
    train(ckpt, epochs=3, batch_size=16, hidden=256)  # data > 1024 bytes
    latest = ckpt.last_saved.name
    # Index files moved by CopyObject, data files by a multipart copy.
    assert {"CopyObject", "UploadPartCopy"} <= {op for op, _ in sent}
    assert_writes_asked_for_bucket_keys(sent)
    bucket, keys = s3_objects(s3_url)

    def archived(key):
        name = key.rsplit("/", 1)[1]
        return not name.startswith(f"{latest}.") and not name.endswith(
            ".json") and name != "checkpoint"

    assert sum(archived(k) for k in keys) >= 4  # ckpt-1, ckpt-2 data+index
    assert_s3_objects_carry(s3_url, "GLACIER_IR", only=archived)
    assert_s3_objects_carry(s3_url, "STANDARD_IA",
                            only=lambda k: not archived(k))
    # An archive still restores.
    first = sorted(i.name for i in keras_ckpt.list_checkpoints(s3_url))[0]
    assert first != latest
    keras_ckpt.restore(new_model(256), s3_url, checkpoint=first)


# --- GCS (fake-gcs-server keeps class and metadata, drops the key) ---------


def record_gcs_requests(uploader):
    """What google-cloud-storage really sends, via requests' own hook."""
    sent = []
    session = uploader._client()._http
    session.hooks["response"].append(
        lambda response, *a, **k: sent.append(response.request))
    return sent


def test_gcs_objects_carry_class_metadata_and_key(local_ckpts, gcs_url):
    uploader = get_uploader(
        gcs_url, kms_key_name=GCS_KEY, storage_class="NEARLINE",
        metadata={"owner": "me"}, **MULTIPART)
    sent = record_gcs_requests(uploader)
    uploader.push(local_ckpts.dir)
    client = uploader._client()
    bucket, _, prefix = gcs_url[len("gs://"):].partition("/")
    blobs = list(client.list_blobs(bucket, prefix=prefix + "/"))
    assert len(blobs) == 7
    for blob in blobs:
        assert blob.storage_class == "NEARLINE", blob.name
        assert blob.metadata == {"owner": "me"}, blob.name
    uploads = [r for r in sent if "/upload/" in r.url]
    assert len(uploads) >= 7
    # fake-gcs-server does not keep kmsKeyName: check every upload asked.
    assert all("kmsKeyName=" + GCS_KEY.replace("/", "%2F") in r.url
               for r in uploads), [r.url for r in uploads]


def test_gcs_archive_rewrites_with_the_archive_class(local_ckpts, gcs_url):
    uploader = get_uploader(gcs_url, kms_key_name=GCS_KEY,
                            metadata={"owner": "me"},
                            archive_storage_class="ARCHIVE")
    uploader.push(local_ckpts.dir)
    sent = record_gcs_requests(uploader)
    assert uploader.archive(["ckpt-1"]) == ["ckpt-1"]
    rewrites = [r for r in sent if "/rewriteTo/" in r.url]
    assert len(rewrites) == 2  # data and index, not the manifest
    for request in rewrites:
        body = json.loads(request.body)
        assert body["storageClass"] == "ARCHIVE"
        assert body["metadata"] == {"owner": "me"}
        assert "destinationKmsKeyName=" in request.url
    assert uploader.archive(["ckpt-1"]) == []  # once per checkpoint


# --- Azure (Azurite keeps tier, tags, metadata; drops the scope) -----------


def test_azure_blobs_carry_tier_tags_metadata_and_scope(local_ckpts,
                                                        azure_url):
    from azure.storage.blob._shared.policies import StorageRequestHook

    uploader = get_uploader(
        azure_url, encryption_scope="ml-cmk", standard_blob_tier="Cool",
        tags={"team": "ml"}, metadata={"owner": "me"}, **MULTIPART)
    container = uploader._container()
    sent = []
    # The SDK's `raw_request_hook`, set for every request of this client.
    hook = next(
        policy for policy in (getattr(p, "_policy", p)
                              for p in container._pipeline._impl_policies)
        if isinstance(policy, StorageRequestHook))
    hook._request_callback = lambda request: sent.append(request.http_request)
    uploader.push(local_ckpts.dir)
    blobs = list(container.list_blobs(
        name_starts_with=uploader.prefix + "/", include=["tags", "metadata"]))
    assert len(blobs) == 7
    for blob in blobs:
        assert blob.blob_tier == "Cool", blob.name
        assert blob.tags == {"team": "ml"}, blob.name
        assert blob.metadata == {"owner": "me"}, blob.name
    # Put Blob, Put Block and Put Block List: every request that writes.
    writes = [r for r in sent if r.method == "PUT"]
    assert any("comp=block&" in r.url or r.url.endswith("comp=block")
               for r in writes)
    assert len(writes) >= 7
    # Azurite does not keep encryption scopes: check every write asked.
    assert all(r.headers.get("x-ms-encryption-scope") == "ml-cmk"
               for r in writes), [(r.method, r.url) for r in writes]


def test_azure_archive_sets_the_tier_of_data_and_index(local_ckpts,
                                                       azure_url):
    uploader = get_uploader(azure_url, archive_blob_tier="Cold")
    uploader.push(local_ckpts.dir)
    assert uploader.archive(["ckpt-1"]) == ["ckpt-1"]
    container = uploader._container()
    tiers = {b.name.rsplit("/", 1)[1]: b.blob_tier for b in
             container.list_blobs(name_starts_with=uploader.prefix + "/")}
    assert tiers["ckpt-1.index"] == "Cold"
    assert tiers["ckpt-1.data-00000-of-00001"] == "Cold"
    assert tiers["ckpt-1.json"] == "Hot"
    assert tiers["ckpt-2.index"] == "Hot"


# --- refusals the emulators cannot produce: the SDKs' own exceptions --------


def test_gcs_and_azure_refusals_name_the_option(gcs_url, azure_url):
    import azure.core.exceptions as azure_exceptions
    import google.api_core.exceptions as api_exceptions

    gcs = get_uploader(gcs_url, retries=0)
    error = api_exceptions.Forbidden(
        "Permission denied on Cloud KMS key. Please ensure that your Cloud "
        "Storage service account has been authorized to use this key.")

    def refused():
        raise error

    with pytest.raises(StorageError) as e:
        gcs._retrying("upload", gcs._url_of("ckpt-1.index"), refused)
    assert "Cloud KMS key permission refused" in str(e.value)
    assert "kms_key_name=" in str(e.value)
    assert "cloudkms.cryptoKeyEncrypterDecrypter" in str(e.value)

    az = get_uploader(azure_url, retries=0)
    error = azure_exceptions.HttpResponseError(
        message="The encryption scope is disabled.")
    error.error_code = "EncryptionScopeDisabled"

    with pytest.raises(StorageError) as e:
        az._retrying("upload", az._url_of("ckpt-1.index"), refused)
    assert "encryption_scope" in str(e.value)
    assert "Nothing was deleted" in str(e.value)


def test_glacier_archive_download_says_to_restore_first(local_ckpts, s3_url,
                                                        tmp_path, request):
    skip_on_seaweedfs(
        request, "SeaweedFS has no archive storage class (a GLACIER object "
        f"stays readable, no InvalidObjectState); {NO_CLASS_CHANGE}")
    uploader = get_uploader(s3_url, ArchiveStorageClass="GLACIER", **FAST)
    uploader.push(local_ckpts.dir)
    assert uploader.archive(["ckpt-1"]) == ["ckpt-1"]
    target = tmp_path / "restore"
    with pytest.raises(StorageError, match="aws s3api restore-object"):
        uploader.download_checkpoint("ckpt-1", str(target))
    assert not [f for f in os.listdir(target) if not f.startswith("ckpt-2")]
    # The rolling checkpoint is untouched and downloads.
    uploader.download_checkpoint("ckpt-2", str(target))


def test_export_uploads_every_file_with_the_environment_options(
        s3_url, monkeypatch, request):
    skip_on_seaweedfs(request, NO_KMS)
    monkeypatch.setenv(
        upload_options_lib.ENV,
        json.dumps({**S3_OPTIONS, "StorageClass": "STANDARD_IA"}),
    )
    keras_ckpt.export_saved_model(new_model(), f"{s3_url}/model")
    bucket, keys = s3_objects(s3_url)
    assert any(k.endswith("saved_model.pb") for k in keys)
    assert any("/variables/" in k for k in keys)
    for key in keys:
        head = s3_client().head_object(Bucket=bucket, Key=key)
        assert head["ServerSideEncryption"] == "aws:kms", key
        assert head["SSEKMSKeyId"] == KEY_ARN, key
        assert head["StorageClass"] == "STANDARD_IA", key
        tags = s3_client().get_object_tagging(Bucket=bucket, Key=key)
        assert {t["Key"] for t in tags["TagSet"]} == {"team", "retention"}


def test_s3_kms_refusal_names_the_key_in_use(s3_url):
    import botocore.exceptions

    uploader = get_uploader(s3_url, retries=0, ServerSideEncryption="aws:kms",
                            SSEKMSKeyId=KEY_ARN)
    # What S3 answers when the key is missing or disabled.
    error = botocore.exceptions.ClientError(
        {"Error": {"Code": "KMS.NotFoundException",
                   "Message": f"Invalid keyId {KEY_ARN}"},
         "ResponseMetadata": {"HTTPStatusCode": 400}},
        "PutObject")

    def refused():
        raise error

    with pytest.raises(StorageError) as e:
        uploader._retrying("write", uploader._url_of("checkpoint"), refused)
    message = str(e.value)
    assert f"this key ({KEY_ARN})" in message
    assert "kms:GenerateDataKey and kms:Decrypt" in message
    assert "KMS.NotFoundException" in message


def test_archives_are_the_checkpoints_kept_only_by_the_hour_rule():
    from keras_ckpt.manager import RetentionPolicy

    hour = 3600.0
    manifests = [
        types.SimpleNamespace(name=f"ckpt-{i}", timestamp=i * 0.5 * hour,
                              metrics={"val_loss": loss})
        for i, loss in enumerate([5, 1, 4, 3, 2, 6, 7], start=1)
    ]
    policy = RetentionPolicy(max_to_keep=2, keep_every_n_hours=1.0,
                             monitor="val_loss", mode="min", keep_best=1)
    kept = policy.select(manifests)
    # Hourly: ckpt-1, 3, 5, 7; newest two: 6, 7; best: ckpt-2.
    assert kept == {"ckpt-1", "ckpt-2", "ckpt-3", "ckpt-5", "ckpt-6",
                    "ckpt-7"}
    assert policy.archives(manifests) == ["ckpt-1", "ckpt-3", "ckpt-5"]
    assert RetentionPolicy(max_to_keep=2).archives(manifests) == []


def test_gcs_every_request_bills_the_user_project(local_ckpts, gcs_url,
                                                  tmp_path):
    uploader = get_uploader(gcs_url, user_project="billing-project")
    sent = record_gcs_requests(uploader)
    uploader.push(local_ckpts.dir)
    uploader.pull(str(tmp_path / "pulled"))
    uploader.delete_checkpoint("ckpt-1")
    # google-cloud-storage 3 also looks the bucket's metadata up on a
    # background thread of its own (`_bucket_metadata_cache`), without
    # userProject; that request is not one keras_ckpt makes.
    ours = [r for r in sent if "/o" in r.url.split("?")[0]]
    assert {"GET", "POST", "DELETE"} <= {r.method for r in ours}
    assert all("userProject=billing-project" in r.url for r in ours), [
        r.url for r in ours if "userProject" not in r.url]


def test_azure_archive_tier_download_says_to_rehydrate(local_ckpts,
                                                       azure_url, tmp_path):
    uploader = get_uploader(azure_url, archive_blob_tier="Archive", **FAST)
    uploader.push(local_ckpts.dir)
    uploader.archive(["ckpt-1"])
    with pytest.raises(StorageError, match="--rehydrate-priority"):
        uploader.download_checkpoint("ckpt-1", str(tmp_path / "restore"))


@pytest.mark.slow
def test_unchanged_script_resumes_on_a_fresh_machine_with_env_options(
        tmp_path, s3_url, subprocess_env, request):
    skip_on_seaweedfs(request, NO_KMS)
    script = os.path.join(os.path.dirname(__file__), "scripts", "train.py")
    env = subprocess_env(**{upload_options_lib.ENV: json.dumps(
        {**S3_OPTIONS, "ExpectedBucketOwner": "123456789012"})})
    local = tmp_path / "vm-disk"
    job = [sys.executable, script, "--dir", str(local), "--mirror", s3_url,
           "--out", str(tmp_path / "out.npz"), "--save-freq", "5"]
    first = subprocess.run(job + ["--kill-at-step", "21"], env=env,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    shutil.rmtree(local)  # a fresh machine: only the mirror is left
    second = subprocess.run(job, env=env, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"resumed from {s3_url}/ckpt-" in second.stdout
    assert_s3_objects_carry(s3_url)
