"""MultiMNIST (Sener & Koltun 2018) from TFDS ``mnist``: two digits per image, two tasks, single-input.

    tfds build mnist --data_dir=$DATA --file_format=array_record
    python -m mtt_jax.main --config configs/multimnist.py --workdir /tmp/mm \\
        --config.data.options.data_dir=$DATA

Images are 28x28 (the 36x36 two-digit canvas resized by nearest neighbour, as in the paper;
``--config.data.options.image_size=36`` keeps the canvas). ``model.patch_size = 4``: 49 patches.
Variant ``tiny``: for tests, on ``tfds_io.mock_data``.
"""

from configs.default import base_config, shrink_for_tests


def get_config(variant: str = ""):
    c = base_config()
    c.data.source = "multimnist"
    c.tasks = ("mnist_left", "mnist_right")
    c.data.options.data_dir = ""          # TFDS data_dir; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.data.options.image_size = 28
    c.model.patch_size = 4
    c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.mlp_dim = 4, 128, 4, 512
    c.batch_size, c.total_steps, c.eval_every, c.checkpoint_every = 256, 10000, 1000, 1000
    c.optimizer.learning_rate = 1e-3
    if variant == "tiny":
        shrink_for_tests(c)
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of configs/multimnist.py; choose '' or 'tiny'")
    return c
