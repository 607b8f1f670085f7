"""Platform detection and presets: where checkpoints, mirrors and exports go.

One training script runs unchanged on a laptop, SageMaker, Vertex AI and
Azure ML: `detect_platform()` reads the environment the platform sets up and
returns a `Platform` with the directories that platform expects.

| platform (detected by) | checkpoint_dir | mirror_url | model_dir (layout) |
|---|---|---|---|
| SageMaker (`SM_MODEL_DIR` or the checkpoint config file) | `/opt/ml/checkpoints` (or the config's `LocalPath`) | None | `$SM_MODEL_DIR` (`"sagemaker"`) |
| Vertex AI (`AIP_MODEL_DIR` or `AIP_CHECKPOINT_DIR`) | a local temp dir, stable per job | `$AIP_CHECKPOINT_DIR` | `$AIP_MODEL_DIR` (`"vertex"`) |
| Azure ML (`AZUREML_RUN_ID`) | `./outputs/checkpoints` | None | `./outputs/model` (`"plain"`) |
| anywhere else | `./checkpoints` | None | `./export` (`"plain"`) |

`KERAS_CKPT_DIR` and `KERAS_CKPT_MIRROR` override the preset's directory and
mirror everywhere (`KERAS_CKPT_MIRROR=none` turns a preset's mirror off).
"""

import dataclasses
import hashlib
import json
import os
import re
import tempfile
from typing import Optional

PLATFORM_NAMES = ("sagemaker", "vertex", "azureml", "local")
EXPORT_LAYOUTS = ("plain", "sagemaker", "vertex")

# SageMaker writes this file when the estimator has `checkpoint_s3_uri`; it
# syncs `LocalPath` to `S3Uri` during the job and restores it on a restart.
SAGEMAKER_CHECKPOINT_CONFIG = "/opt/ml/input/config/checkpointconfig.json"
SAGEMAKER_CHECKPOINT_DIR = "/opt/ml/checkpoints"
SAGEMAKER_MODEL_DIR = "/opt/ml/model"

# Vertex AI's TF_CONFIG names worker pools 0..3 chief, worker, ps, evaluator;
# CLUSTER_SPEC keeps the pool names.
_VERTEX_POOL_TASK_TYPES = {
    "workerpool0": "chief",
    "workerpool1": "worker",
    "workerpool2": "ps",
    "workerpool3": "evaluator",
}
_TRAINING_TASK_TYPES = ("chief", "master", "worker")
_DISPLAY_NAMES = {
    "sagemaker": "SageMaker",
    "vertex": "Vertex AI",
    "azureml": "Azure ML",
    "local": "local environment",
}


@dataclasses.dataclass(frozen=True)
class Platform:
    """Where this process should keep checkpoints and export models.

    Returned by `keras_ckpt.detect_platform()`; `keras_ckpt.Checkpoint` and
    `keras_ckpt.ExportSavedModel` use it when `directory`, `mirror` or
    `export_dir` are left to `None`.

    Attributes:
        name: str, one of `"sagemaker"`, `"vertex"`, `"azureml"`, `"local"`.
        checkpoint_dir: str, absolute local directory for checkpoints.
        mirror_url: str or None, URL checkpoints are mirrored to
            (e.g. `"gs://bucket/job/checkpoints"`).
        model_dir: str, root the exported SavedModel goes under: a local path
            or a URL (Vertex AI's `AIP_MODEL_DIR` is a `gs://` URL).
        export_layout: str, `"sagemaker"` (numeric version dir under
            `model_dir`), `"vertex"` (`saved_model.pb` directly in
            `model_dir`) or `"plain"` (numeric version dir).
        is_chief: bool, whether this process writes checkpoints, mirrors and
            exports in a multi-worker job. True without `TF_CONFIG`.
        task_type: str or None, this task's type in `TF_CONFIG` /
            `CLUSTER_SPEC` (`"chief"`, `"worker"`, `"ps"`, `"evaluator"`), or
            None when the job is not distributed.
        task_index: int, this task's index within its type (0 if none).
        num_workers: int, number of training replicas (chief plus workers).
        synced_to: str or None, URL the *platform itself* copies
            `checkpoint_dir` to (SageMaker's `checkpoint_s3_uri`), if known.
    """

    name: str
    checkpoint_dir: str
    mirror_url: Optional[str]
    model_dir: str
    export_layout: str
    is_chief: bool = True
    task_type: Optional[str] = None
    task_index: int = 0
    num_workers: int = 1
    synced_to: Optional[str] = None

    def __post_init__(self):
        if self.name not in PLATFORM_NAMES:
            raise ValueError(
                "Invalid value for argument `name`. "
                f"Received: name={self.name!r}. Expected one of {PLATFORM_NAMES}."
            )
        if self.export_layout not in EXPORT_LAYOUTS:
            raise ValueError(
                "Invalid value for argument `export_layout`. "
                f"Received: export_layout={self.export_layout!r}. "
                f"Expected one of {EXPORT_LAYOUTS}."
            )

    @property
    def display_name(self):
        """Human name of the platform, e.g. `"Vertex AI"`."""
        return _DISPLAY_NAMES[self.name]

    def describe(self):
        """Returns a one-line summary for verbose logs.

        Example:

        >>> platform = detect_platform({"AIP_CHECKPOINT_DIR": "gs://b/ckpt",
        ...                             "AIP_MODEL_DIR": "gs://b/model",
        ...                             "CLOUD_ML_JOB_ID": "123"})
        >>> platform.describe()  # doctest: +ELLIPSIS
        'Detected Vertex AI: checkpoints in ..., mirror gs://b/ckpt, export to gs://b/model'
        """
        parts = [f"checkpoints in {self.checkpoint_dir}"]
        if self.synced_to:
            parts[0] += f" (synced by {self.display_name} to {self.synced_to})"
        elif self.name == "sagemaker":
            parts[0] += (
                " (not synced to S3: set `checkpoint_s3_uri` on the estimator"
                " to keep them across restarts)"
            )
        parts.append(f"mirror {self.mirror_url}" if self.mirror_url else "no mirror")
        if self.export_layout == "vertex":
            parts.append(f"export to {self.model_dir}")
        else:
            parts.append(f"export to {_join(self.model_dir, '<version>')}")
        text = f"Detected {self.display_name}: " + ", ".join(parts)
        if self.task_type is not None:
            role = "chief" if self.is_chief else "not chief: writes no checkpoints, restores the chief's"
            text += (
                f" [task {self.task_type}:{self.task_index} of "
                f"{self.num_workers} training replicas, {role}]"
            )
        return text


def detect_platform(environ=None, *, sagemaker_checkpoint_config=SAGEMAKER_CHECKPOINT_CONFIG):
    """Detects the training platform from the environment.

    Reads environment variables only (plus SageMaker's checkpoint config file);
    makes no network call and creates no directory.

    Args:
        environ: Mapping of environment variables to read. Defaults to
            `None`, which reads `os.environ`.
        sagemaker_checkpoint_config: str, path of SageMaker's checkpoint
            config file. Defaults to
            `"/opt/ml/input/config/checkpointconfig.json"`.

    Returns:
        A `Platform`.

    Raises:
        ValueError: if `TF_CONFIG` or `CLUSTER_SPEC` is not valid JSON.

    Example:

    ```python
    platform = keras_ckpt.detect_platform()
    print(platform.describe())
    # Detected local environment: checkpoints in /home/me/proj/checkpoints,
    # no mirror, export to /home/me/proj/export/<version>
    ```
    """
    env = os.environ if environ is None else environ
    preset = (
        _sagemaker(env, sagemaker_checkpoint_config)
        or _vertex(env)
        or _azureml(env)
        or _local()
    )
    overrides = {}
    if _get(env, "KERAS_CKPT_DIR"):
        overrides["checkpoint_dir"] = os.path.abspath(
            os.path.expanduser(env["KERAS_CKPT_DIR"])
        )
    mirror = _get(env, "KERAS_CKPT_MIRROR")
    if mirror:
        overrides["mirror_url"] = None if mirror.lower() == "none" else _gcs_url(mirror)
    return dataclasses.replace(preset, **overrides, **_cluster_role(env))


def _sagemaker(env, checkpoint_config_path):
    config = _read_json_file(checkpoint_config_path)
    if not _get(env, "SM_MODEL_DIR") and config is None:
        return None
    config = config or {}
    return Platform(
        name="sagemaker",
        checkpoint_dir=config.get("LocalPath") or SAGEMAKER_CHECKPOINT_DIR,
        mirror_url=None,
        model_dir=_get(env, "SM_MODEL_DIR") or SAGEMAKER_MODEL_DIR,
        export_layout="sagemaker",
        synced_to=config.get("S3Uri") or None,
    )


def _vertex(env):
    model_dir = _get(env, "AIP_MODEL_DIR")
    checkpoint_url = _get(env, "AIP_CHECKPOINT_DIR")
    if not model_dir and not checkpoint_url:
        return None
    # The VM's disk is lost with the VM, so the working dir only has to
    # survive a process restart on the same VM; the mirror is what survives.
    job_key = _get(env, "CLOUD_ML_JOB_ID") or hashlib.sha256(
        (checkpoint_url or model_dir).encode()
    ).hexdigest()[:16]
    job_key = re.sub(r"[^A-Za-z0-9._-]", "_", job_key)
    return Platform(
        name="vertex",
        checkpoint_dir=os.path.join(
            tempfile.gettempdir(), "keras_ckpt", f"vertex-{job_key}"
        ),
        mirror_url=_gcs_url(checkpoint_url) if checkpoint_url else None,
        model_dir=_gcs_url(model_dir) if model_dir else os.path.abspath("export"),
        export_layout="vertex" if model_dir else "plain",
    )


def _azureml(env):
    if not _get(env, "AZUREML_RUN_ID"):
        return None
    # Azure ML uploads ./outputs with the run and keeps it across
    # low-priority preemption.
    return Platform(
        name="azureml",
        checkpoint_dir=os.path.abspath(os.path.join("outputs", "checkpoints")),
        mirror_url=None,
        model_dir=os.path.abspath(os.path.join("outputs", "model")),
        export_layout="plain",
    )


def _local():
    return Platform(
        name="local",
        checkpoint_dir=os.path.abspath("checkpoints"),
        mirror_url=None,
        model_dir=os.path.abspath("export"),
        export_layout="plain",
    )


def _cluster_role(env):
    """Returns is_chief, task_type, task_index and num_workers."""
    tf_config = _parse_json_env(env, "TF_CONFIG")
    if tf_config and tf_config.get("task"):
        cluster = tf_config.get("cluster") or {}
        task_type = tf_config["task"].get("type")
        task_index = int(tf_config["task"].get("index", 0))
    else:
        cluster_spec = _parse_json_env(env, "CLUSTER_SPEC")
        if not (cluster_spec and cluster_spec.get("task")):
            return dict(is_chief=True, task_type=None, task_index=0, num_workers=1)
        cluster = {
            _VERTEX_POOL_TASK_TYPES.get(pool, pool): hosts
            for pool, hosts in (cluster_spec.get("cluster") or {}).items()
        }
        pool = cluster_spec["task"].get("type")
        task_type = _VERTEX_POOL_TASK_TYPES.get(pool, pool)
        task_index = int(cluster_spec["task"].get("index", 0))
    has_chief = bool(cluster.get("chief") or cluster.get("master"))
    if task_type in ("chief", "master"):
        is_chief = True
    else:
        is_chief = task_type == "worker" and task_index == 0 and not has_chief
    num_workers = sum(len(cluster.get(t) or ()) for t in _TRAINING_TASK_TYPES)
    return dict(
        is_chief=is_chief,
        task_type=task_type,
        task_index=task_index,
        num_workers=max(num_workers, 1),
    )


def _gcs_url(path):
    """Turns Vertex AI's Cloud Storage FUSE path `/gcs/b/p` into `gs://b/p`."""
    if path.startswith("/gcs/"):
        return "gs://" + path[len("/gcs/"):]
    return path


def _join(root, name):
    if "://" in root:
        return root.rstrip("/") + "/" + name
    return os.path.join(root, name)


def _get(env, key):
    value = env.get(key)
    return value.strip() if value and value.strip() else None


def _parse_json_env(env, key):
    raw = _get(env, key)
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"The environment variable `{key}` is not valid JSON ({e}). "
            f"Received: {key}={raw!r}"
        ) from None
    if not isinstance(value, dict):
        raise ValueError(
            f"The environment variable `{key}` must hold a JSON object. "
            f"Received: {key}={raw!r}"
        )
    return value


def _read_json_file(path):
    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        # The file's existence is what tells us we are on SageMaker; an
        # unreadable one still means "SageMaker, default LocalPath".
        return {}
    return value if isinstance(value, dict) else {}
