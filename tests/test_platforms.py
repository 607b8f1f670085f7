"""Tests for keras_ckpt.platforms.detect_platform."""

import json
import os
import tempfile

import pytest

from keras_ckpt.platforms import Platform, detect_platform

NO_CONFIG = "/nonexistent/checkpointconfig.json"


def detect(env, config=NO_CONFIG):
    return detect_platform(env, sagemaker_checkpoint_config=config)


@pytest.fixture(autouse=True)
def in_tmp_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_local_defaults(in_tmp_cwd):
    platform = detect({})
    assert platform.name == "local"
    assert platform.checkpoint_dir == str(in_tmp_cwd / "checkpoints")
    assert platform.mirror_url is None
    assert platform.model_dir == str(in_tmp_cwd / "export")
    assert platform.export_layout == "plain"
    assert platform.is_chief
    assert (platform.task_type, platform.task_index, platform.num_workers) == (None, 0, 1)
    assert not os.path.exists(platform.checkpoint_dir)  # detection creates nothing


def test_reads_os_environ_by_default(monkeypatch):
    for key in ("SM_MODEL_DIR", "AIP_MODEL_DIR", "AIP_CHECKPOINT_DIR", "AZUREML_RUN_ID",
                "KERAS_CKPT_DIR", "KERAS_CKPT_MIRROR", "TF_CONFIG", "CLUSTER_SPEC"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AZUREML_RUN_ID", "run-1")
    assert detect_platform(sagemaker_checkpoint_config=NO_CONFIG).name == "azureml"


def test_sagemaker_from_sm_model_dir():
    platform = detect({"SM_MODEL_DIR": "/opt/ml/model"})
    assert platform.name == "sagemaker"
    assert platform.checkpoint_dir == "/opt/ml/checkpoints"
    assert platform.mirror_url is None
    assert platform.model_dir == "/opt/ml/model"
    assert platform.export_layout == "sagemaker"
    assert platform.synced_to is None
    assert "not synced to S3" in platform.describe()


def test_sagemaker_from_checkpoint_config_file(tmp_path):
    config = tmp_path / "checkpointconfig.json"
    config.write_text(json.dumps({"LocalPath": "/data/ckpt", "S3Uri": "s3://bucket/run/ckpt"}))
    platform = detect({}, config=str(config))
    assert platform.name == "sagemaker"
    assert platform.checkpoint_dir == "/data/ckpt"
    assert platform.model_dir == "/opt/ml/model"
    assert platform.synced_to == "s3://bucket/run/ckpt"
    assert "synced by SageMaker to s3://bucket/run/ckpt" in platform.describe()


def test_sagemaker_config_without_local_path_uses_default(tmp_path):
    config = tmp_path / "checkpointconfig.json"
    config.write_text(json.dumps({"S3Uri": "s3://bucket/ckpt"}))
    platform = detect({"SM_MODEL_DIR": "/opt/ml/model"}, config=str(config))
    assert platform.checkpoint_dir == "/opt/ml/checkpoints"


VERTEX_ENV = {
    "AIP_MODEL_DIR": "gs://bucket/job/model",
    "AIP_CHECKPOINT_DIR": "gs://bucket/job/checkpoints",
    "CLOUD_ML_JOB_ID": "8812345",
}


def test_vertex_preset():
    platform = detect(VERTEX_ENV)
    assert platform.name == "vertex"
    assert platform.mirror_url == "gs://bucket/job/checkpoints"
    assert platform.model_dir == "gs://bucket/job/model"
    assert platform.export_layout == "vertex"
    assert platform.checkpoint_dir == os.path.join(
        tempfile.gettempdir(), "keras_ckpt", "vertex-8812345")
    assert platform.describe() == (
        f"Detected Vertex AI: checkpoints in {platform.checkpoint_dir}, "
        "mirror gs://bucket/job/checkpoints, export to gs://bucket/job/model"
    )


def test_vertex_working_dir_is_stable_per_job_without_job_id():
    env = {k: v for k, v in VERTEX_ENV.items() if k != "CLOUD_ML_JOB_ID"}
    first = detect(env).checkpoint_dir
    assert first == detect(dict(env)).checkpoint_dir
    other = dict(env, AIP_CHECKPOINT_DIR="gs://bucket/other/checkpoints")
    assert detect(other).checkpoint_dir != first
    assert first.startswith(tempfile.gettempdir())


def test_vertex_accepts_gcs_fuse_paths():
    platform = detect({"AIP_CHECKPOINT_DIR": "/gcs/bucket/job/checkpoints",
                       "AIP_MODEL_DIR": "/gcs/bucket/job/model"})
    assert platform.mirror_url == "gs://bucket/job/checkpoints"
    assert platform.model_dir == "gs://bucket/job/model"


def test_vertex_checkpoint_dir_only_exports_plain(in_tmp_cwd):
    platform = detect({"AIP_CHECKPOINT_DIR": "gs://bucket/ckpt"})
    assert platform.name == "vertex"
    assert platform.export_layout == "plain"
    assert platform.model_dir == str(in_tmp_cwd / "export")


def test_azureml_preset(in_tmp_cwd):
    platform = detect({"AZUREML_RUN_ID": "run-42"})
    assert platform.name == "azureml"
    assert platform.checkpoint_dir == str(in_tmp_cwd / "outputs" / "checkpoints")
    assert platform.model_dir == str(in_tmp_cwd / "outputs" / "model")
    assert platform.mirror_url is None
    assert platform.export_layout == "plain"


def test_sagemaker_wins_over_other_markers():
    env = dict(VERTEX_ENV, SM_MODEL_DIR="/opt/ml/model", AZUREML_RUN_ID="x")
    assert detect(env).name == "sagemaker"


def test_env_overrides_apply_to_any_preset(tmp_path):
    env = dict(VERTEX_ENV, KERAS_CKPT_DIR=str(tmp_path / "mine"),
               KERAS_CKPT_MIRROR="s3://elsewhere/ckpt")
    platform = detect(env)
    assert platform.name == "vertex"
    assert platform.checkpoint_dir == str(tmp_path / "mine")
    assert platform.mirror_url == "s3://elsewhere/ckpt"
    assert platform.model_dir == "gs://bucket/job/model"

    local = detect({"KERAS_CKPT_DIR": "rel/dir", "KERAS_CKPT_MIRROR": "file:///mnt/m"})
    assert local.checkpoint_dir == os.path.abspath("rel/dir")
    assert local.mirror_url == "file:///mnt/m"


def test_mirror_override_none_disables_preset_mirror():
    assert detect(dict(VERTEX_ENV, KERAS_CKPT_MIRROR="none")).mirror_url is None
    # An empty variable is treated as unset.
    assert detect(dict(VERTEX_ENV, KERAS_CKPT_MIRROR="")).mirror_url == "gs://bucket/job/checkpoints"


def tf_config(task_type, index, cluster):
    return {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})}


CLUSTER_WITH_CHIEF = {"chief": ["c:1"], "worker": ["w0:1", "w1:1"], "ps": ["p:1"]}
CLUSTER_NO_CHIEF = {"worker": ["w0:1", "w1:1", "w2:1"]}


@pytest.mark.parametrize("task_type,index,cluster,is_chief,num_workers", [
    ("chief", 0, CLUSTER_WITH_CHIEF, True, 3),
    ("worker", 0, CLUSTER_WITH_CHIEF, False, 3),
    ("worker", 1, CLUSTER_WITH_CHIEF, False, 3),
    ("ps", 0, CLUSTER_WITH_CHIEF, False, 3),
    ("worker", 0, CLUSTER_NO_CHIEF, True, 3),
    ("worker", 2, CLUSTER_NO_CHIEF, False, 3),
    ("evaluator", 0, {"worker": ["w0:1"], "evaluator": ["e:1"]}, False, 1),
])
def test_chief_from_tf_config(task_type, index, cluster, is_chief, num_workers):
    platform = detect(tf_config(task_type, index, cluster))
    assert platform.is_chief is is_chief
    assert platform.task_type == task_type
    assert platform.task_index == index
    assert platform.num_workers == num_workers


def cluster_spec(pool, index):
    return {"CLUSTER_SPEC": json.dumps({
        "cluster": {"workerpool0": ["cmle-0:2222"],
                    "workerpool1": ["cmle-w0:2222", "cmle-w1:2222"]},
        "environment": "cloud",
        "task": {"type": pool, "index": index},
    })}


def test_chief_from_vertex_cluster_spec():
    primary = detect(dict(VERTEX_ENV, **cluster_spec("workerpool0", 0)))
    assert (primary.is_chief, primary.task_type, primary.num_workers) == (True, "chief", 3)
    worker = detect(dict(VERTEX_ENV, **cluster_spec("workerpool1", 0)))
    assert (worker.is_chief, worker.task_type, worker.task_index) == (False, "worker", 0)
    assert "not chief" in worker.describe()


def test_tf_config_takes_precedence_over_cluster_spec():
    env = dict(cluster_spec("workerpool0", 0), **tf_config("worker", 1, CLUSTER_WITH_CHIEF))
    assert detect(env).is_chief is False


def test_tf_config_without_task_means_single_process():
    platform = detect({"TF_CONFIG": json.dumps({"cluster": {}})})
    assert platform.is_chief and platform.task_type is None


def test_invalid_tf_config_names_the_variable():
    with pytest.raises(ValueError, match="TF_CONFIG"):
        detect({"TF_CONFIG": "{not json"})


def test_platform_validates_fields():
    with pytest.raises(ValueError, match="export_layout"):
        Platform(name="local", checkpoint_dir="/c", mirror_url=None,
                 model_dir="/m", export_layout="zip")


def test_platform_is_frozen():
    platform = detect({})
    with pytest.raises(Exception):
        platform.name = "vertex"


def test_describe_local_mentions_version_placeholder(in_tmp_cwd):
    text = detect({}).describe()
    assert text.startswith("Detected local environment: checkpoints in ")
    assert "no mirror" in text
    assert os.path.join(str(in_tmp_cwd), "export", "<version>") in text
