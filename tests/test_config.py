"""Configuration schema, validation and the shipped config files."""

import importlib.util
import pathlib

import pytest

from msad_jax.config import ConfigError, check_keys, default_config, validate_config

CONFIGS = sorted((pathlib.Path(__file__).parent.parent / "configs").glob("*.py"))


def _load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_defaults_are_the_published_recipe():
    c = validate_config(default_config())
    assert (c.backbone, c.loss, c.temperature) == ("resnet152", "msc", 0.25)
    assert (c.learning_rate, c.weight_decay, c.batch_size, c.epochs) == (1e-5, 5e-5, 64, 20)
    assert (c.knn_k, c.angular, c.dtype, c.frozen) == (2, False, "float32", "default")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_file_is_valid_and_documents_its_command(path):
    module = _load(path)
    config = module.get_config()
    if config.dataset == "folder" and not config.data_dir:
        config.data_dir = "/some/images"
    if "study_losses" in config:  # conditioning-study configs extend the schema
        from msad_jax.analysis.study_config import validate_study_config

        validate_study_config(config)
    else:
        validate_config(config)
    assert f"--config configs/{path.name}" in module.__doc__


def _results_paragraph(doc):
    paragraphs = [p for p in doc.split("\n\n") if p.lstrip().startswith("Results")]
    assert len(paragraphs) == 1, "one paragraph starting with 'Results'"
    return " ".join(paragraphs[0].split())


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_says_where_its_numbers_come_from(path):
    doc = _load(path).__doc__
    assert "Expected" not in doc, "state measured or published numbers, not expectations"
    results = _results_paragraph(doc)
    measured = "measured" in results and "benchmarks/results/" in results
    published = "not measured with this project" in results and "Published" in results
    nothing = results.startswith("Results: none to compare")
    assert measured or published or nothing, results


def test_shipped_configs_cover_the_protocols():
    names = {p.stem for p in CONFIGS}
    assert {"cifar10", "cifar10_resnet18", "cifar100", "fashion_mnist", "cats_vs_dogs", "folder",
            "smoke"} <= names  # fmt: skip


def test_unknown_keys_list_the_valid_ones():
    with pytest.raises(ConfigError, match="Unknown config key.*'?bogus'?; valid keys are: .*seed"):
        check_keys(["seed", "bogus"])
    config = default_config()
    config.unlock() if hasattr(config, "unlock") else None
    config.bogus = 1
    with pytest.raises(ConfigError, match="bogus"):
        validate_config(config)


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("dataset", "imagenet", "not one of"),
        ("backbone", "vgg16", "not one of"),
        ("loss", "simclr", "not one of"),
        ("dtype", "float16", "not one of"),
        ("batch_size", 0, "must be > 0"),
        ("epochs", -1, "must be >= 0"),
        ("threshold_quantile", 1.0, "must lie in"),
        ("threshold_fpr", 0.0, "must lie in"),
        ("calibration_holdout", 1.0, "must lie in"),
        ("crop", -2, "crop"),
    ],
)
def test_bad_values_name_the_key(key, value, fragment):
    config = default_config()
    config[key] = value
    with pytest.raises(ConfigError, match=fragment) as info:
        validate_config(config)
    assert f"config.{key}" in str(info.value)
    assert "\n" not in str(info.value)


def test_threshold_quantile_of_earlier_versions_sets_the_target_fpr():
    config = default_config()
    config.threshold_quantile = 0.9  # an earlier config file
    assert validate_config(config).threshold_fpr == pytest.approx(0.1)
    config.threshold_fpr = 0.2
    with pytest.raises(ConfigError, match="contradicts config.threshold_fpr=0.2") as info:
        validate_config(config)
    assert "\n" not in str(info.value)


def test_folder_needs_a_path():
    config = default_config()
    config.dataset = "folder"
    with pytest.raises(ConfigError, match="data_dir"):
        validate_config(config)
