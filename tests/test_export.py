"""Tests for keras_ckpt.export.export_saved_model."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_ckpt.errors import ExportExistsError, KerasCkptError, StorageError
from keras_ckpt.export import export_saved_model


def dense_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((4,), name="features"),
        keras.layers.Dense(8, activation="relu"),
        keras.layers.Dense(3),
    ])


@pytest.fixture(scope="module")
def model():
    return dense_model()


def serve(path, inputs):
    """Calls `serving_default` of the SavedModel at `path`; returns one array."""
    loaded = tf.saved_model.load(path)
    assert {"serve", "serving_default"} <= set(loaded.signatures)
    signature = loaded.signatures["serving_default"]
    if not isinstance(inputs, dict):
        (name,) = signature.structured_input_signature[1]
        inputs = {name: inputs}
    outputs = signature(**{k: tf.constant(v) for k, v in inputs.items()})
    (output,) = outputs.values()
    return output.numpy()


def test_plain_layout_default_version(model, tmp_path):
    x = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    path = export_saved_model(model, tmp_path / "export")
    assert path == str(tmp_path / "export" / "1")
    assert os.path.isfile(os.path.join(path, "saved_model.pb"))
    np.testing.assert_allclose(serve(path, x), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    # Nothing but the version dir is left next to it (no temp dirs).
    assert os.listdir(tmp_path / "export") == ["1"]


def test_dropout_and_batchnorm_export_inference_behaviour(tmp_path):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(16),
        keras.layers.BatchNormalization(),
        keras.layers.Dropout(0.5),
        keras.layers.Dense(2),
    ])
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 2.0, size=(64, 6)).astype("float32")
    model.fit(x, rng.normal(size=(64, 2)), epochs=2, batch_size=16, verbose=0)
    path = export_saved_model(model, tmp_path, version=4)
    served = serve(path, x[:8])
    np.testing.assert_allclose(served, model.predict(x[:8], verbose=0), rtol=1e-5, atol=1e-5)
    # Deterministic: dropout is off in the exported function.
    np.testing.assert_allclose(served, serve(path, x[:8]))


def test_multi_input_model_serving_default_takes_named_inputs(tmp_path):
    a = keras.Input((3,), name="age")
    b = keras.Input((2,), name="bmi")
    out = keras.layers.Dense(1)(keras.layers.Concatenate()([a, b]))
    model = keras.Model({"age": a, "bmi": b}, out)
    inputs = {"age": np.ones((2, 3), "float32"), "bmi": np.full((2, 2), 2.0, "float32")}
    path = export_saved_model(model, tmp_path)
    loaded = tf.saved_model.load(path)
    assert set(loaded.signatures["serving_default"].structured_input_signature[1]) == {"age", "bmi"}
    np.testing.assert_allclose(serve(path, inputs), model.predict(inputs, verbose=0), rtol=1e-5)


def test_sagemaker_layout_uses_numeric_version_dir(model, tmp_path):
    path = export_saved_model(model, tmp_path / "model", layout="sagemaker", version=7)
    assert path == str(tmp_path / "model" / "7")
    assert os.path.isfile(tmp_path / "model" / "7" / "saved_model.pb")
    assert os.path.isdir(tmp_path / "model" / "7" / "variables")


def test_vertex_layout_writes_at_the_root(model, tmp_path):
    model_dir = tmp_path / "aip_model_dir"
    path = export_saved_model(model, model_dir, layout="vertex")
    assert path == str(model_dir)
    assert os.path.isfile(model_dir / "saved_model.pb")
    assert not any(name.isdigit() for name in os.listdir(model_dir))
    assert sorted(os.listdir(tmp_path)) == ["aip_model_dir"]  # no temp dir left


@pytest.mark.parametrize("version", [-1, "1", 1.5, True])
def test_invalid_version_names_the_argument(model, tmp_path, version):
    with pytest.raises(ValueError, match="argument `version`"):
        export_saved_model(model, tmp_path, version=version)
    assert os.listdir(tmp_path) == []


def test_vertex_layout_takes_no_version(model, tmp_path):
    with pytest.raises(ValueError, match="argument `version`.*Expected None"):
        export_saved_model(model, tmp_path, layout="vertex", version=2)


def test_version_zero_and_numpy_ints_are_accepted(model, tmp_path):
    assert export_saved_model(model, tmp_path, version=0) == str(tmp_path / "0")
    assert export_saved_model(model, tmp_path, version=np.int64(12)) == str(tmp_path / "12")


def test_invalid_layout_names_the_argument(model, tmp_path):
    with pytest.raises(ValueError, match="argument `layout`.*layout='tfserving'"):
        export_saved_model(model, tmp_path, layout="tfserving")


def test_unbuilt_model_is_refused(tmp_path):
    model = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="must be built"):
        export_saved_model(model, tmp_path)
    assert os.listdir(tmp_path) == []


def test_refuses_to_overwrite_unless_asked(tmp_path):
    first, second = dense_model(seed=0), dense_model(seed=1)
    x = np.ones((1, 4), "float32")
    path = export_saved_model(first, tmp_path, version=2)
    with pytest.raises(ExportExistsError, match=str(tmp_path / "2")) as info:
        export_saved_model(second, tmp_path, version=2)
    assert isinstance(info.value, FileExistsError) and isinstance(info.value, KerasCkptError)
    np.testing.assert_allclose(serve(path, x), first.predict(x, verbose=0), rtol=1e-5)

    assert export_saved_model(second, tmp_path, version=2, overwrite=True) == path
    np.testing.assert_allclose(serve(path, x), second.predict(x, verbose=0), rtol=1e-5)
    assert os.listdir(tmp_path) == ["2"]


def test_empty_existing_version_dir_is_fine(model, tmp_path):
    (tmp_path / "1").mkdir()
    path = export_saved_model(model, tmp_path)
    assert os.path.isfile(os.path.join(path, "saved_model.pb"))


def test_crashed_export_leaves_nothing_that_looks_complete(model, tmp_path, monkeypatch):
    def crash(self, filepath, **kwargs):
        os.makedirs(os.path.join(filepath, "variables"), exist_ok=True)
        with open(os.path.join(filepath, "saved_model.pb"), "wb") as f:
            f.write(b"half")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(type(model), "export", crash)
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_saved_model(model, tmp_path / "export", version=3)
    assert os.listdir(tmp_path / "export") == []


def test_file_url_is_exported_locally_then_uploaded(model, tmp_path):
    url = f"file://{tmp_path}/bucket/models"
    x = np.ones((2, 4), "float32")
    # The directory above the export root plays the bucket: it must exist.
    with pytest.raises(StorageError, match="bucket"):
        export_saved_model(model, url, version=5)
    (tmp_path / "bucket").mkdir()
    result = export_saved_model(model, url + "/", version=5)
    assert result == url + "/5"
    local = tmp_path / "bucket" / "models" / "5"
    assert os.path.isfile(local / "saved_model.pb")
    np.testing.assert_allclose(serve(str(local), x), model.predict(x, verbose=0), rtol=1e-5)
    with pytest.raises(ExportExistsError, match="/bucket/models/5"):
        export_saved_model(model, url, version=5)
    assert export_saved_model(model, url, version=5, overwrite=True) == url + "/5"

    vertex = export_saved_model(model, f"file://{tmp_path}/aip", layout="vertex")
    assert vertex == f"file://{tmp_path}/aip"
    assert os.path.isfile(tmp_path / "aip" / "saved_model.pb")


class RecordingUploader:
    """Records the calls `export_saved_model` makes to an Uploader."""

    def __init__(self, url, existing=()):
        self.url = url
        self.calls = []
        self.existing = {name: 1 for name in existing}

    def list_files(self):
        return dict(self.existing)

    def delete_file(self, name):
        self.calls.append(("delete", name))
        self.existing.pop(name, None)

    def upload_file(self, local_path, name, progress=None):
        assert os.path.isfile(local_path)
        self.calls.append(("upload", name))
        self.existing[name] = os.path.getsize(local_path)


def test_remote_upload_sends_saved_model_pb_last(model):
    uploaders = []

    def factory(url):
        uploaders.append(RecordingUploader(url))
        return uploaders[-1]

    result = export_saved_model(model, "gs://bucket/job/model", layout="sagemaker",
                                version=3, uploader_factory=factory)
    assert result == "gs://bucket/job/model/3"
    (uploader,) = uploaders
    assert uploader.url == "gs://bucket/job/model"
    names = [name for op, name in uploader.calls]
    assert names[-1] == "3/saved_model.pb"
    assert "3/variables/variables.index" in names
    assert all(name.startswith("3/") and "\\" not in name for name in names)


def test_remote_other_versions_do_not_block_a_new_one(model):
    uploader = RecordingUploader("gs://b/m", existing=["1/saved_model.pb"])
    export_saved_model(model, "gs://b/m", version=2, uploader_factory=lambda url: uploader)
    assert ("upload", "2/saved_model.pb") in uploader.calls
    assert not any(op == "delete" for op, _ in uploader.calls)


def test_remote_overwrite_replaces_the_old_export_safely(model):
    old = ["saved_model.pb", "variables/variables.index",
           "variables/variables.data-00000-of-00002"]
    uploader = RecordingUploader("s3://b/m", existing=old)
    with pytest.raises(ExportExistsError, match="s3://b/m"):
        export_saved_model(model, "s3://b/m", layout="vertex",
                           uploader_factory=lambda url: uploader)
    assert uploader.calls == []
    export_saved_model(model, "s3://b/m", layout="vertex", overwrite=True,
                       uploader_factory=lambda url: uploader)
    ops = uploader.calls
    assert ops[0] == ("delete", "saved_model.pb")
    last_upload = max(i for i, op in enumerate(ops) if op[0] == "upload")
    assert ops[last_upload] == ("upload", "saved_model.pb")
    # The stale shard goes, after the new model is complete.
    assert ops[last_upload + 1:] == [("delete", "variables/variables.data-00000-of-00002")]
    assert "variables/variables.data-00000-of-00002" not in uploader.existing
