"""keras_ckpt's one-pass writer of TensorFlow's checkpoint format (bundle.py).

TensorFlow itself is the oracle: for the same tensors, `bundle.write` must
produce the files `tf.train.Checkpoint.write` (or the `SaveV2` op, for
arbitrary keys) produces, byte for byte, and TensorFlow's reader must read
back every value bit for bit. Hypothesis draws the dtypes, shapes, values
and keys.
"""

import os
import weakref

import google_crc32c
import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import keras_ckpt
from keras_ckpt import _keras_compat
from keras_ckpt import bundle
from keras_ckpt import manager as manager_lib
from keras_ckpt import manifest as manifest_lib
from keras_ckpt.engine import state as state_lib

BUNDLE = settings(deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture,
                                         HealthCheck.too_slow])

NUMERIC = [tf.float32, tf.float64, tf.float16, tf.bfloat16, tf.int8,
           tf.int16, tf.int32, tf.int64, tf.uint8, tf.uint16, tf.uint32,
           tf.uint64, tf.bool, tf.complex64, tf.complex128]


def files_of(prefix):
    return [prefix + bundle.DATA_SUFFIX, prefix + bundle.INDEX_SUFFIX]


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def assert_same_files(ours, theirs):
    for a, b in zip(files_of(ours), files_of(theirs)):
        assert read_bytes(a) == read_bytes(b), (
            f"{os.path.basename(a)} differs from TensorFlow's")


@st.composite
def tensors(draw):
    """A tensor of any dtype the writer handles, with any bit pattern."""
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    size = int(np.prod(shape))
    kind = draw(st.sampled_from(NUMERIC + [tf.string]))
    if kind == tf.string:
        values = draw(st.lists(st.binary(max_size=40), min_size=size,
                               max_size=size))
        return tf.constant(np.array(values, dtype=object).reshape(shape),
                           dtype=tf.string)
    if kind == tf.bool:
        values = draw(st.lists(st.booleans(), min_size=size, max_size=size))
        return tf.constant(np.array(values, dtype=bool).reshape(shape))
    dtype = kind.as_numpy_dtype
    raw = draw(st.binary(min_size=size * np.dtype(dtype).itemsize,
                         max_size=size * np.dtype(dtype).itemsize))
    # Any bit pattern, NaN payloads included: written bit for bit.
    return tf.constant(np.frombuffer(raw, dtype=dtype).reshape(shape),
                       dtype=kind)


group_names = st.from_regex(r"[a-z][a-z0-9_]{0,11}", fullmatch=True)


@pytest.fixture(params=["direct", "page-cache"])
def io_mode(request, monkeypatch):
    """Both ways the data file is written (O_DIRECT, or the page cache)."""
    monkeypatch.setenv("KERAS_CKPT_DIRECT_IO",
                       "1" if request.param == "direct" else "0")
    return request.param


@BUNDLE
@given(groups=st.dictionaries(group_names,
                              st.lists(tensors(), min_size=1, max_size=4),
                              min_size=1, max_size=4))
def test_checkpoints_match_tensorflows_byte_for_byte(tmp_path_factory, io_mode,
                                                    groups):
    directory = tmp_path_factory.mktemp("bundle")
    tf.train.Checkpoint(**{
        g: _keras_compat.tensor_list(ts) for g, ts in groups.items()
    }).write(str(directory / "theirs"))
    snapshot = state_lib.Snapshot(tensors=dict(groups), specs={}, values={})
    store = manager_lib.LocalCheckpoints(directory)
    files = store._write_files(snapshot, "ckpt-1", None, None)

    assert snapshot.tensors == {}  # handed to the writer
    assert_same_files(str(directory / "ckpt-1"), str(directory / "theirs"))
    assert files == manifest_lib.describe_files(
        str(directory), store.data_files("ckpt-1"))
    reader = tf.train.load_checkpoint(str(directory / "ckpt-1"))
    for group, ts in groups.items():
        for i, t in enumerate(ts):
            got = reader.get_tensor(manager_lib.tensor_key(group, i))
            if t.dtype == tf.string:
                assert np.asarray(got, dtype=object).tolist() == (
                    np.asarray(t.numpy(), dtype=object).tolist())
            else:
                assert np.asarray(got).dtype == t.dtype.as_numpy_dtype
                assert np.asarray(got).tobytes() == t.numpy().tobytes()


keys = st.text(st.characters(codec="utf-8", exclude_characters="\0"),
               min_size=1, max_size=30)


@BUNDLE
@given(entries=st.dictionaries(keys, tensors(), min_size=1, max_size=30))
def test_any_keys_index_like_tensorflows_save_op(tmp_path_factory, entries):
    """Keys with shared prefixes, high bytes, any order: the index's
    LevelDB table (prefix compression, separators) as TensorFlow's."""
    directory = tmp_path_factory.mktemp("keys")
    names = list(entries)
    tf.raw_ops.SaveV2(prefix=str(directory / "theirs"),
                      tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[entries[n] for n in names])
    bundle.write(str(directory / "ours"), [
        (n, entries[n].dtype.as_datatype_enum, entries[n].shape,
         entries[n].numpy()) for n in names])
    assert_same_files(str(directory / "ours"), str(directory / "theirs"))


def test_large_tensors_across_staging_buffers(tmp_path, io_mode, monkeypatch):
    """Tensors larger than a chunk, and tails that are not a multiple of the
    O_DIRECT alignment, in either write mode."""
    monkeypatch.setattr(bundle, "_CHUNK", 1 << 16)
    rng = np.random.default_rng(1)
    ts = [tf.constant(rng.standard_normal(n).astype("float32"))
          for n in (70_001, 1, 16_384, 33_333)]
    tf.train.Checkpoint(m=_keras_compat.tensor_list(ts)).write(
        str(tmp_path / "theirs"))
    files = manager_lib.LocalCheckpoints(tmp_path)._write_files(
        state_lib.Snapshot(tensors={"m": ts}, specs={}, values={}), "ckpt-1",
        None, None)
    assert_same_files(str(tmp_path / "ckpt-1"), str(tmp_path / "theirs"))
    assert files["ckpt-1" + bundle.DATA_SUFFIX]["size"] == os.path.getsize(
        tmp_path / ("ckpt-1" + bundle.DATA_SUFFIX))


@pytest.mark.parametrize("count", [3, 12_000, 40_000])
def test_index_of_many_tensors_spans_table_blocks(tmp_path, count):
    """Past 256 KiB the index has several data blocks and index entries."""
    ts = [tf.constant(np.float32(i)) for i in range(count)]
    tf.train.Checkpoint(m=_keras_compat.tensor_list(ts)).write(
        str(tmp_path / "theirs"))
    snapshot = state_lib.Snapshot(tensors={"m": ts}, specs={}, values={})
    manager_lib.LocalCheckpoints(tmp_path)._write_files(
        snapshot, "ckpt-1", None, None)
    assert_same_files(str(tmp_path / "ckpt-1"), str(tmp_path / "theirs"))
    if count == 40_000:
        assert os.path.getsize(tmp_path / "ckpt-1.index") > 2 * 262144


@BUNDLE
@given(a=st.binary(max_size=3000), b=st.binary(max_size=3000))
def test_crc32c_combine(a, b):
    assert bundle.crc32c_combine(
        google_crc32c.value(a), google_crc32c.value(b), len(b)
    ) == google_crc32c.value(a + b)


def test_without_the_native_checksum_the_files_are_the_same(
        tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    rows = lambda: [  # noqa: E731
        ("a", 1, (100_000,), rng.standard_normal(100_000).astype("float32")),
        ("b", 7, (2,), np.array([b"xy", b""], dtype=object))]
    first = bundle.write(str(tmp_path / "native"), rows())
    assert bundle._native_extend() is not None  # the fast path exists here
    monkeypatch.setattr(bundle, "_native_extend", lambda: None)
    rng = np.random.default_rng(0)
    second = bundle.write(str(tmp_path / "fallback"), rows())
    assert list(first.values()) == list(second.values())
    assert_same_files(str(tmp_path / "native"), str(tmp_path / "fallback"))


def test_tensors_are_released_as_they_are_written(tmp_path, monkeypatch):
    monkeypatch.setattr(bundle, "_CHUNK", 1 << 16)
    arrays = [np.full(1 << 18, i, dtype=np.float32) for i in range(3)]
    refs = [weakref.ref(a) for a in arrays]
    rows = [(f"t{i}", 1, a.shape, a) for i, a in enumerate(arrays)]
    del arrays
    alive_while_writing_last = []

    def progress(nbytes):
        alive_while_writing_last.append([r() is not None for r in refs])

    bundle.write(str(tmp_path / "c"), rows, progress=progress)
    assert rows == [None] * 3
    # While the last tensor was written, the first two were already freed.
    assert alive_while_writing_last[-1] == [False, False, True]
    assert all(r() is None for r in refs)


def test_cancelled_write_leaves_no_files(tmp_path, io_mode, monkeypatch):
    monkeypatch.setattr(bundle, "_CHUNK", 1 << 16)
    rows = [("t", 1, (1 << 20,), np.zeros(1 << 20, np.float32))]
    calls = []
    with pytest.raises(bundle.Cancelled):
        bundle.write(str(tmp_path / "c"), rows,
                     cancelled=lambda: calls.append(1) or len(calls) > 2)
    assert os.listdir(tmp_path) == []


def test_failed_write_leaves_no_files(tmp_path):
    class Boom(Exception):
        pass

    def explode():
        raise Boom()

    rows = [("a", 1, (10,), np.zeros(10, np.float32)), ("b", 1, (), explode)]
    with pytest.raises(Boom):
        bundle.write(str(tmp_path / "c"), rows)
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="DataType 21"):  # DT_VARIANT
        bundle.write(str(tmp_path / "c"), [("v", 21, (1,), np.zeros(1))])
    with pytest.raises(ValueError, match="unique"):
        bundle.write(str(tmp_path / "c"), [("v", 1, (), np.zeros(1))] * 2)
    with pytest.raises(ValueError, match="do not match"):
        bundle.write(str(tmp_path / "c"), [("v", 1, (1,), np.zeros(1))])
    with pytest.raises(ValueError, match="strings for shape"):
        bundle.write(str(tmp_path / "c"), [("v", 7, (2,), [b"a"])])
    assert os.listdir(tmp_path) == []


def test_tensorflow_writes_what_the_one_pass_writer_cannot(
        tmp_path, monkeypatch):
    """A dtype outside `bundle.supported` falls back to TensorFlow's writer,
    and the checkpoint is the same."""
    groups = {"m": [tf.constant(np.arange(6, dtype=np.float32))],
              "s": [tf.constant([b"a", b"bc"])]}
    store = manager_lib.LocalCheckpoints(tmp_path)
    store._write_files(state_lib.Snapshot(dict(groups), {}, {}), "ckpt-1",
                       None, None)
    monkeypatch.setattr(bundle, "supported", lambda dtype: False)
    used = []
    original = manager_lib.LocalCheckpoints._write_files_with_tf
    monkeypatch.setattr(
        manager_lib.LocalCheckpoints, "_write_files_with_tf",
        lambda self, *a: used.append(1) or original(self, *a))
    store._write_files(state_lib.Snapshot(dict(groups), {}, {}), "ckpt-2",
                       None, None)
    assert used == [1]
    assert_same_files(str(tmp_path / "ckpt-1"), str(tmp_path / "ckpt-2"))


def test_fit_writes_with_the_one_pass_writer(tmp_path, monkeypatch):
    """Everything a real job saves (mixed precision, the optimizer, RNGs,
    the data position of a tf.data input, a stateful callback) takes the
    one-pass path, and restores."""
    def refuse(self, *args):
        raise AssertionError("fell back to TensorFlow's writer")

    monkeypatch.setattr(manager_lib.LocalCheckpoints, "_write_files_with_tf",
                        refuse)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
                                  keras.layers.Dropout(0.5),
                                  keras.layers.Dense(1, dtype="float32")])
        model.compile(optimizer="adam", loss="mse")
        x = np.random.default_rng(0).standard_normal((64, 4)).astype("f4")
        data = tf.data.Dataset.from_tensor_slices((x, x[:, :1])).shuffle(
            64, seed=1).batch(8)
        plateau = keras.callbacks.ReduceLROnPlateau(monitor="loss")
        ckpt = keras_ckpt.Checkpoint(directory=tmp_path, save_freq=3,
                                     state={"plateau": plateau})
        model.fit(data, epochs=2, verbose=0, callbacks=[ckpt, plateau])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    infos = keras_ckpt.list_checkpoints(tmp_path)
    assert infos and all(i.complete for i in infos)
    latest = str(tmp_path / infos[-1].name)
    assert bundle.OBJECT_GRAPH_KEY in dict(tf.train.list_variables(latest))
    manifest = manifest_lib.Manifest.from_json(
        read_bytes(str(tmp_path / (infos[-1].name + ".json"))).decode())
    assert manifest_lib.local_problems(str(tmp_path), manifest,
                                       checksums=True) == []

