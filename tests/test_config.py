"""The config a user writes: the how-to's file loads as is; every bad value is named with what is allowed."""

from pathlib import Path

import pytest

from sdswarm.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]
HOWTO_KEYS = [
    "model", "extended_chunks", "clip_penultimate", "fp16", "resolution", "seed", "train_text_encoder", "lr", "ucg",
    "use_ema", "opt_betas_one", "opt_betas_two", "opt_epsilon", "opt_weight_decay", "buckets_shuffle",
    "buckets_side_min", "buckets_side_max",
]


def test_howto_config_loads_unchanged():
    config = load_config(ROOT / "configs" / "sd_1-5.yaml")
    assert config.model == "runwayml/stable-diffusion-v1-5"
    assert (config.extended_chunks, config.clip_penultimate, config.fp16) == (2, True, True)
    assert (config.resolution, config.seed, config.train_text_encoder) == (512, 42, True)
    # YAML 1.1 reads 1e-4 as a string: it must still become the number the user meant
    assert config.lr == pytest.approx(1e-4) and config.opt_epsilon == pytest.approx(1e-8)
    assert config.opt_weight_decay == pytest.approx(1e-2)
    assert (config.ucg, config.use_ema, config.opt_betas_one, config.opt_betas_two) == (0.1, False, 0.9, 0.999)
    assert (config.buckets_shuffle, config.buckets_side_min, config.buckets_side_max) == (True, 256, 512)
    # the how-to's hivemind settings are the defaults
    swarm = config.swarm
    assert (swarm.run_id, swarm.target_batch_size, swarm.matchmaking_time) == ("testrun", 75000, 260.0)
    assert swarm.averaging_timeout == swarm.allreduce_timeout == swarm.load_state_timeout == 1200.0
    assert (swarm.sync, swarm.compression) == ("every_step", "auto")  # auto: scaled_fp16 gradients


def test_howto_file_has_exactly_the_howto_keys_and_the_howtos_bucket():
    text = (ROOT / "configs" / "sd_1-5.yaml").read_text()
    top = [line.split(":")[0] for line in text.splitlines() if line.strip() and not line.startswith((" ", "#"))]
    assert top == [*HOWTO_KEYS, "data"]
    data = load_config(ROOT / "configs" / "sd_1-5.yaml").data
    assert data.source == ("https://crowdcloud.us-southeast-1.linodeobjects.com/crowdcloud/opendataset/v1/danbooru/"
                           "{post_id}.{image_ext}")
    assert data.index == "danbooru.db"


def test_the_demo_data_with_a_real_model_is_refused_saying_how_to_point_at_real_data():
    with pytest.raises(ConfigError) as caught:
        load_config(ROOT / "configs" / "sd_1-5.yaml", {"data.source": "builtin:demo"})
    message = str(caught.value)
    assert "builtin:demo" in message and "runwayml/stable-diffusion-v1-5" in message
    assert "data.source" in message and "data.index" in message and "sdswarm index build --from-dump" in message
    assert load_config(ROOT / "configs" / "tiny.yaml").data.source == "builtin:demo"  # the tiny model's data


def test_tiny_config_loads():
    config = load_config(ROOT / "configs" / "tiny.yaml")
    assert config.model == "builtin:tiny" and config.train.max_steps


@pytest.mark.parametrize("name", ["tiny.yaml", "sd_1-5.yaml"])
def test_shipped_configs_form_groups_faster_than_matchmaking_lasts(name):
    swarm = load_config(ROOT / "configs" / name).swarm
    assert swarm.matchmaking_request_timeout < swarm.matchmaking_time


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ({"lr": "fast"}, ["'lr'", "'fast'", "valid number"]),
        ({"lr": 0}, ["'lr'", "0", "greater than 0"]),
        ({"ucg": 1.5}, ["'ucg'", "1.5", "less than or equal to 1"]),
        ({"resolution": 500}, ["'resolution'", "500", "multiple of 8"]),
        ({"fp16": "maybe"}, ["'fp16'", "'maybe'", "valid boolean"]),
        ({"extended_chunks": 0}, ["'extended_chunks'", "0", "greater than or equal to 1"]),
        ({"opt_betas_two": 1.0}, ["'opt_betas_two'", "1.0", "less than 1"]),
        ({"swarm.compression": "zip"}, ["'swarm.compression'", "'zip'", "'scaled_fp16'", "'uniform8bit'"]),
        ({"swarm.sync": "sometimes"}, ["'swarm.sync'", "'every_step' or 'local_steps'"]),
        ({"swarm.outer_momentum": 1}, ["'swarm.outer_momentum'", "less than 1"]),
        ({"train.batch_size": -2}, ["'train.batch_size'", "-2", "greater than 0"]),
        ({"buckets_side_min": 1024}, ["buckets_side_min (1024)", "buckets_side_max (512)"]),
        ({"buckets_side_max": 500}, ["buckets_side_max (500)", "multiple of data.bucket_step (64)"]),
        ({"swarm.request_timeout": 300}, ["swarm.request_timeout (300)", "below swarm.matchmaking_time (260)"]),
    ],
)
def test_bad_values_are_named_with_what_is_allowed(override, names):
    with pytest.raises(ConfigError) as caught:
        load_config(ROOT / "configs" / "sd_1-5.yaml", override)
    for name in names:
        assert name in str(caught.value)


def test_unknown_key_is_refused_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown key 'modle'; did you mean 'model'"):
        parse_config({"model": "x", "modle": "y"})
    nested = r"unknown key 'swarm.target_batchsize'; did you mean 'target_batch_size'"
    with pytest.raises(ConfigError, match=nested):
        parse_config({"model": "x", "swarm": {"target_batchsize": 5}})


def test_missing_model_and_non_mapping_file(tmp_path):
    with pytest.raises(ConfigError, match="key 'model' is required"):
        parse_config({})
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")


def test_config_round_trips_through_yaml(tmp_path):
    config = load_config(ROOT / "configs" / "tiny.yaml")
    saved = tmp_path / "saved.yaml"
    saved.write_text(config.to_yaml())
    assert load_config(saved) == config


@pytest.mark.parametrize(
    ("data", "keys"),
    [
        ({"model": "x", "modle": 1}, ("modle",)),
        ({"model": "x", "train": {"max_steps": -1}}, ("train.max_steps",)),
        ({"model": "x", "buckets_side_min": 1024}, ("buckets_side_min", "buckets_side_max")),
        ({"model": "x", "fp16": True, "train": {"mixed_precision": "bf16"}}, ("fp16", "train.mixed_precision")),
        ({"model": "x", "data": {"source": "builtin:demo"}}, ("data.source", "model")),
    ],
)
def test_errors_carry_the_keys_to_fix(data, keys):
    with pytest.raises(ConfigError) as error:
        parse_config(data)
    assert error.value.keys == keys


def test_the_old_name_of_max_swarm_steps_still_reads():
    assert parse_config({"model": "builtin:tiny", "train": {"max_epochs": 3}}).train.max_swarm_steps == 3
    assert parse_config({"model": "builtin:tiny", "train": {"max_swarm_steps": 4}}).train.max_swarm_steps == 4
