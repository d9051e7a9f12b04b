"""CelebA: 40 binary face attributes as 40 tasks (single-input), from TFDS ``celeb_a``.

    tfds build celeb_a --data_dir=$DATA --file_format=array_record
    python -m mtt_jax.main --config configs/celeba.py --workdir /tmp/celeba \\
        --config.data.options.data_dir=$DATA

Images: the whole image resized to 64x64 RGB (as Sener & Koltun 2018); ``model.patch_size = 8``: 64
patches, plus one task token per attribute. The first run caches the resized images (about 2 GB under
data_dir). Eval on the validation split (``--config.data.options.eval_split=test`` for the test split).
Variant ``tiny``: for tests, on ``tfds_io.mock_data`` (16x16 images, 4 patches).
"""

from configs.default import base_config, shrink_for_tests
from mtt_jax.data.celeba import TASK_NAMES


def get_config(variant: str = ""):
    c = base_config()
    c.data.source = "celeba"
    c.tasks = TASK_NAMES
    c.data.options.data_dir = ""          # TFDS data_dir; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.data.options.image_size = 64
    c.model.patch_size = 8
    c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.mlp_dim = 4, 192, 6, 768
    c.batch_size, c.total_steps, c.eval_every, c.checkpoint_every = 256, 20000, 2000, 2000
    c.optimizer.learning_rate = 1e-3
    c.weighting.diagnostics_every = 0     # 40 per-task gradients are costly; turn on when needed
    if variant == "tiny":
        c.data.options.image_size = 16
        shrink_for_tests(c)
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of configs/celeba.py; choose '' or 'tiny'")
    return c
