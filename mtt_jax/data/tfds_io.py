"""TensorFlow Datasets on disk: find a prepared dataset, read a split once, cache what was made of it.

The TFDS sources (``glue``, ``multimnist``, ``celeba``) read each split they need once, in order, turn it
into numpy arrays (token ids, small images, labels) and save those under
``<data_dir>/mtt_jax_cache/`` (a local folder for a bucket's ``data_dir``: `cache_root`), so a second
run starts from the cache in about a second and never touches TFDS again. Batches are then cut from the arrays by index, which is what makes every batch a
pure function of ``(seed, step)`` and lets each process load only its rows.

Reading uses TFDS's random-access data source (``builder.as_data_source``, array_record files, no
TensorFlow needed). A dataset prepared in the default tfrecord format is read with ``tf.data``
instead (``builder.as_dataset``), which needs TensorFlow installed.

Nothing here downloads: a dataset that is not prepared under ``data_dir`` raises
``DatasetNotPreparedError`` with the ``tfds build`` command that prepares it.

Tests and benchmarks use ``mock_data`` (``tfds.testing.mock_data`` with random examples in the datasets'
real feature structure).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import os
from typing import Any, Callable, Iterator
from unittest import mock

import numpy as np
from absl import logging

from mtt_jax.run import workdir
from mtt_jax.data.base import DatasetNotPreparedError

# The module that registers each dataset's builder. Without TensorFlow, ``import tensorflow_datasets``
# registers no builders by itself, so the one needed is imported by name.
BUILDER_MODULES = {
    "glue": "tensorflow_datasets.text.glue",
    "mnist": "tensorflow_datasets.image_classification.mnist",
    "celeb_a": "tensorflow_datasets.image.celeba",
}
CACHE_FOLDER = "mtt_jax_cache"
_CHUNK = 512  # examples per read task


def _tfds():
    try:
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    except ImportError:
        raise DatasetNotPreparedError(
            "tensorflow-datasets is not installed; run: pip install -r requirements.txt") from None
    return tfds


def resolve_data_dir(data_dir: str = "") -> str:
    """``data_dir``, or TFDS's default (``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``)."""
    if data_dir:
        return os.path.expanduser(data_dir)
    return os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def prepared_builder(name: str, data_dir: str):
    """The TFDS builder of ``name`` (e.g. ``"glue/cola"``) over ``data_dir``, checked to be prepared.

    Raises:
        DatasetNotPreparedError: one line with the command that prepares it.
    """
    tfds = _tfds()
    importlib.import_module(BUILDER_MODULES[name.split("/")[0]])
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        raise DatasetNotPreparedError(
            f"TFDS dataset {name} is not prepared under data_dir={data_dir}; prepare it with: "
            f"tfds build {name} --data_dir={data_dir} --file_format=array_record "
            f"(or set data.options.data_dir to the directory that holds it)")
    return builder


def read_split(name: str, split: str, data_dir: str, convert: Callable[[dict], Any] = lambda x: x,
               num_threads: int = 1) -> tuple[int, Iterator[Any]]:
    """``(num_examples, iterator of convert(example))`` over one split, in the split's order.

    ``convert`` runs on ``num_threads`` threads (image decoding and resizing release the GIL).
    """
    builder = prepared_builder(name, data_dir)
    try:
        source = builder.as_data_source(split=split)
    except NotImplementedError:  # prepared as tfrecord: no random access, read it with tf.data
        return _read_with_tf_data(builder, name, split, data_dir, convert)
    num_examples = len(source)
    chunks = [range(start, min(start + _CHUNK, num_examples)) for start in range(0, num_examples, _CHUNK)]
    read_chunk = lambda chunk: [convert(source[i]) for i in chunk]

    def examples() -> Iterator[Any]:
        logging.info("reading %s %s (%d examples) from %s", name, split, num_examples, data_dir)
        if num_threads <= 1:
            for chunk in chunks:
                yield from read_chunk(chunk)
            return
        with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
            for converted in pool.map(read_chunk, chunks):
                yield from converted

    return num_examples, examples()


def _read_with_tf_data(builder, name: str, split: str, data_dir: str, convert) -> tuple[int, Iterator]:
    try:
        import tensorflow  # pylint: disable=import-outside-toplevel,unused-import  # noqa: F401
    except ImportError:
        raise DatasetNotPreparedError(
            f"TFDS dataset {name} under data_dir={data_dir} is stored as tfrecord, which needs "
            f"TensorFlow to read; pip install tensorflow-cpu, or rebuild it with: tfds build {name} "
            f"--data_dir={data_dir} --file_format=array_record") from None
    tfds = _tfds()
    num_examples = builder.info.splits[split].num_examples
    dataset = builder.as_dataset(split=split, shuffle_files=False)
    return num_examples, (convert(example) for example in tfds.as_numpy(dataset))


def text(value) -> str:
    """A TFDS text feature as ``str`` (data sources give ``str`` or ``bytes``, ``tf.data`` ``bytes``)."""
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8")
    if isinstance(value, np.ndarray):
        return text(value.item())
    return str(value)


# --- Cache ------------------------------------------------------------------------------------------

def cache_path(data_dir: str, *parts: str) -> str:
    """``<cache root>/<parts...>`` (`cache_root`); the caller puts every setting that changes the arrays
    (dataset version, split, tokenizer, length, image size) into ``parts``."""
    return os.path.join(cache_root(data_dir), *parts)


def cache_root(data_dir: str) -> str:
    """``<data_dir>/mtt_jax_cache`` beside a local ``data_dir``. The cache is written through renames
    and read as memory maps, which need a local disk, so for a bucket's (``gs://BUCKET/tfds``: TFDS
    reads it through epath) it is a local folder named after the URL, under ``$MTT_JAX_CACHE_DIR``
    (default ``~/.cache/mtt_jax``): each host then reads the bucket once and keeps its own cache."""
    if workdir.is_url(data_dir):
        scheme, path = data_dir.split("://", 1)
        base = os.path.expanduser(os.environ.get("MTT_JAX_CACHE_DIR", "~/.cache/mtt_jax"))
        return os.path.join(base, scheme, path.strip("/"))
    return os.path.join(data_dir, CACHE_FOLDER)


def cached_arrays(path: str, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays saved at ``path`` (an ``.npz``), or ``build()`` saved there first.

    The file is written under a temporary name and renamed, so concurrent processes (several hosts
    sharing one ``data_dir``) never read a partial cache.
    """
    if os.path.exists(path):
        with np.load(path) as saved:
            return {key: saved[key] for key in saved.files}
    arrays = build()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}.npz"
    np.savez(temporary, **arrays)
    os.replace(temporary, path)
    logging.info("cached %s", path)
    return arrays


def cached_memmap(path: str, shape: tuple[int, ...], dtype, fill: Callable[[np.ndarray], None]) -> np.ndarray:
    """A read-only memory map of the ``.npy`` at ``path``, written first by ``fill(writable_array)``.

    For arrays too large to hold in memory (CelebA's images): batches read only their rows from disk.
    """
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temporary = f"{path}.tmp-{os.getpid()}.npy"
        array = np.lib.format.open_memmap(temporary, mode="w+", dtype=dtype, shape=shape)
        fill(array)
        array.flush()
        del array
        os.replace(temporary, path)
        logging.info("cached %s", path)
    return np.load(path, mmap_mode="r")


# --- Mock data for tests and benchmarks -------------------------------------------------------------

@contextlib.contextmanager
def mock_data(num_examples: int = 16) -> Iterator[None]:
    """Every TFDS read in this context gets ``num_examples`` random examples per split, in the real
    feature structure of the dataset (``tfds.testing.mock_data``), and every dataset counts as
    prepared. Nothing is read from or written to the TFDS ``data_dir``; our cache still is."""
    tfds = _tfds()
    with tfds.testing.mock_data(num_examples=num_examples), \
            mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True):
        yield
