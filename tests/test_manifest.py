"""The typed Manifest: saved manifests read and write back unchanged, old ones load with defaults, bad ones fail."""

import copy
import dataclasses
import json
from pathlib import Path

import pytest

from helpers import run
from transferkit.errors import TransferkitError
from transferkit.store import artifacts
from transferkit.store.manifest import Manifest

# What base_manifest (training/runs.py), pretraining/run.py and finetuning/run.py write, listed by hand.
EVERY_ARTIFACT = {"format", "kind", "created", "input_shape", "input_dtype", "image_size", "resize", "value_range",
                  "data", "split", "versions"}
ENCODER_KEYS = EVERY_ARTIFACT | {"task", "arch", "activation", "normalization", "output_shape", "pictures", "stages",
                                 "metrics"}
CLASSIFIER_KEYS = EVERY_ARTIFACT | {"num_classes", "base", "blocks", "stages", "semi_supervised", "augment", "mixup",
                                    "cutmix", "class_weight", "ema", "metrics"}
# Keys added after the first version, and the defaults an older manifest without them loads with.
NEWER_CLASSIFIER_KEYS = {"resize": "stretch", "semi_supervised": {"mode": "none"}, "augment": "none", "mixup": 0.0,
                         "cutmix": 0.0, "class_weight": {"setting": "none", "weights": None}, "ema": None}


def saved(folder) -> dict:
    """The manifest as training wrote it: the session's shared artifacts may have been exported by other tests since."""
    manifest = json.loads((Path(folder) / artifacts.MANIFEST).read_text())
    manifest.pop("exports", None)
    return manifest


def artifact_with(tmp_path: Path, manifest: dict) -> Path:
    """A folder read_manifest accepts (a model file beside it), holding `manifest` as its manifest.json."""
    folder = tmp_path / "artifact"
    folder.mkdir()
    (folder / artifacts.MODEL).write_bytes(b"")
    (folder / artifacts.MANIFEST).write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize("which, keys", [("encoder_dir", ENCODER_KEYS), ("classifier_dir", CLASSIFIER_KEYS)])
def test_a_saved_manifest_reads_and_writes_back_byte_for_byte(which, keys, request, tmp_path):
    folder = request.getfixturevalue(which)
    text = (Path(folder) / artifacts.MANIFEST).read_text()
    exported = "exports" in json.loads(text)  # another test may have exported the shared artifact
    assert set(json.loads(text)) - {"exports"} == keys  # a kind's fields only, none of the other kind's
    manifest = artifacts.read_manifest(folder)
    assert manifest.to_json() == json.loads(text) == Manifest.from_json(json.loads(text)).to_json()
    assert manifest.absent == (set() if exported else {"exports"}) and manifest.extra == {}
    artifacts.write_manifest(tmp_path, manifest)
    assert (tmp_path / artifacts.MANIFEST).read_text() == text


def test_the_fields_hold_what_the_json_says(classifier_dir):
    d, manifest = saved(classifier_dir), artifacts.read_manifest(classifier_dir, ("classifier",))
    assert (manifest.kind, manifest.num_classes, manifest.input_shape) == ("classifier", 10, d["input_shape"])
    assert (manifest.data.spec, manifest.data.fingerprint, manifest.split.seed) == (
        "digits", d["data"]["fingerprint"], d["split"]["seed"])
    assert manifest.base.kind == "encoder" and manifest.base.extra == {"from": str(d["base"]["from"])}
    assert manifest.task is None and manifest.stages == d["stages"]


def test_an_old_classifier_manifest_loads_with_the_documented_defaults_and_is_not_filled_in(classifier_dir, tmp_path):
    old = saved(classifier_dir)
    for key in NEWER_CLASSIFIER_KEYS:
        del old[key]
    del old["data"]["skipped"]
    manifest = artifacts.read_manifest(artifact_with(tmp_path, old))
    assert {key: getattr(manifest, key) for key in NEWER_CLASSIFIER_KEYS} == NEWER_CLASSIFIER_KEYS
    assert manifest.data.skipped == [] and manifest.exports == {}
    assert manifest.absent == set(NEWER_CLASSIFIER_KEYS) | {"exports"} and manifest.data.absent == {"skipped"}
    assert manifest.to_json() == old  # written back, it still says only what it said


def test_an_old_encoder_manifest_without_stages_or_pictures_loads_with_empty_lists(encoder_dir):
    old = {k: v for k, v in saved(encoder_dir).items() if k not in ("stages", "pictures")}
    manifest = Manifest.from_json(old)
    assert (manifest.stages, manifest.pictures) == ([], [])
    assert manifest.to_json() == old


def test_unknown_keys_survive_a_round_trip_through_the_file(encoder_dir, tmp_path):
    d = saved(encoder_dir)
    newer = {**copy.deepcopy(d), "trained_on": "elsewhere", "num_classes": 3,  # a classifier's key on an encoder
             "data": {**d["data"], "licence": "CC0"}, "split": {**d["split"], "stratified": True}}
    folder = artifact_with(tmp_path, newer)
    manifest = artifacts.read_manifest(folder)
    assert manifest.extra == {"trained_on": "elsewhere", "num_classes": 3} and manifest.num_classes is None
    assert manifest.data.extra == {"licence": "CC0"} and manifest.split.extra == {"stratified": True}
    artifacts.write_manifest(folder, manifest)
    assert saved(folder) == newer


def test_an_export_record_is_written_once_there_is_one(encoder_dir):
    manifest = Manifest.from_json(saved(encoder_dir))
    assert "exports" not in manifest.to_json() and "exports" in manifest.absent
    exported = dataclasses.replace(manifest, exports={"savedmodel": {"path": "serving"}})  # what export does
    assert exported.to_json() == {**saved(encoder_dir), "exports": {"savedmodel": {"path": "serving"}}}
    assert Manifest.from_json(exported.to_json()).to_json() == exported.to_json()


@pytest.mark.parametrize("key, value, named", [
    ("input_shape", "64", "'input_shape' should be list[int]"),
    ("input_shape", [8, "8"], "'input_shape[1]' should be int"),
    ("num_classes", True, "'num_classes' should be int"),
    ("data", {"spec": 3}, "'data.spec' should be str"),
    ("data", [], "'data' should be a JSON object"),
    ("value_range", [0, None], "'value_range[1]' should be float"),
])
def test_a_wrong_type_is_refused_in_one_line_naming_the_file_and_key(classifier_dir, tmp_path, key, value, named):
    folder = artifact_with(tmp_path, {**saved(classifier_dir), key: value})
    with pytest.raises(TransferkitError) as caught:
        artifacts.read_manifest(folder)
    message = str(caught.value)
    assert "\n" not in message and str(folder / artifacts.MANIFEST) in message and named in message


@pytest.mark.parametrize("drop", ["kind", "input_shape", "num_classes"])
def test_a_manifest_without_a_key_every_version_wrote_is_refused(classifier_dir, tmp_path, drop):
    folder = artifact_with(tmp_path, {k: v for k, v in saved(classifier_dir).items() if k != drop})
    with pytest.raises(TransferkitError, match=rf"is not a transferkit manifest: it has no '{drop}'\.$"):
        artifacts.read_manifest(folder)


def test_json_that_is_not_an_object_is_refused(tmp_path):
    folder = artifact_with(tmp_path, [1, 2])
    with pytest.raises(TransferkitError, match="'the manifest' should be a JSON object"):
        artifacts.read_manifest(folder)


def test_a_pipelines_manifest_of_the_wrong_type_is_not_written(encoder_dir, tmp_path):
    with pytest.raises(TransferkitError, match="'output_shape' should be"):
        artifacts.write_manifest(tmp_path, {**saved(encoder_dir), "output_shape": "4"})
    assert not (tmp_path / artifacts.MANIFEST).exists()


def test_the_cli_reports_a_damaged_manifest_in_one_line_and_exits_1(classifier_dir, tmp_path):
    folder = artifact_with(tmp_path, {**saved(classifier_dir), "input_shape": "64"})
    result = run("evaluate", folder)
    assert result.exit_code == 1 and "'input_shape' should be list[int]" in result.output
