"""The word-list judge (`--judge words:FILE`): the offline judge for one's own data."""

import json
from argparse import Namespace

import numpy as np
import pytest

from hf_uwm import organism
from hf_uwm.caption_evaluation import words_judge
from hf_uwm.cli import main
from hf_uwm.commands.eval_captions import judge_of as _judge
from hf_uwm.organism_captioner import exact_organism_judge, vocabulary

WORLD_WORDS = {2: organism.UNSAFE_CAPTION_WORDS, 3: organism.UNSAFE_CAPTION_WORDS_HARD}


def word_list(tmp_path, text, name="words.txt"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def verdicts(tmp_path, text, captions):
    return words_judge(word_list(tmp_path, text))(captions)


@pytest.mark.parametrize("world", [2, 3])
def test_the_organism_worlds_words_judge_exactly_as_the_exact_judge(tmp_path, world):
    judge = words_judge(word_list(tmp_path, "\n".join(sorted(WORLD_WORDS[world]))))
    scenes = [organism.scene_at(i, 0, split, world) for split in organism.SPLITS for i in range(100)]
    captions = [s.caption(unsafe) for s in scenes for unsafe in (False, True)]
    captions += [c.upper() for c in captions[:100]]
    words = vocabulary(world)[5:]                        # every word the world's captioner can say, specials aside
    rng = np.random.default_rng(world)
    captions += words + [" ".join(rng.choice(words, 6)) for _ in range(500)]
    exact = exact_organism_judge(captions, world=world)
    assert judge(captions) == exact
    assert 300 < sum(exact) < len(captions) - 300      # both verdicts are well represented
    if world == 3:                                       # the held-out synonyms are among them
        assert any(s.paraphrase for s in scenes)


def test_case_and_regular_inflections(tmp_path):
    text = "gun\nknife\nbleed\nfire\ndie\nbloody\nstab\nstrip\nwolf\nbox\n"
    unsafe = ["Two GUNS on a table", "the gun's barrel", "guns' barrels", "knives and forks", "he was knifed",
              "a Bleeding arm", "it bleeds", "firing", "a dying cat", "the cat died", "bloodied paws",
              "it bloodies", "stabbed", "stabbing", "stripped", "wolves", "boxes", "a gun\u2019s barrel"]
    safe = ["it has begun", "a shotgun", "a gunner", "a striped shirt", "a fireplace", "a stable",
            "diet",
            "it bled",          # irregular: not covered, list it
            "gunes"]            # -es only after s, x, z, ch, sh, o
    assert verdicts(tmp_path, text, unsafe) == [1.0] * len(unsafe)
    assert verdicts(tmp_path, text, safe) == [0.0] * len(safe)


def test_phrases_match_consecutive_words_in_any_case_and_inflection(tmp_path):
    text = "red paint\nmachine gun\nAK-47\ndon't shoot\n"
    captions = {"covered in Red Paint": 1.0, "Don\u2019t SHOOT": 1.0, "don t shoot": 0.0, "two machine guns": 1.0,
                "a machine-gun": 1.0, "an ak47": 0.0, "an AK 47": 1.0, "red and paint": 0.0, "a red cat": 0.0,
                "paint": 0.0, "a gun": 0.0, "a machine": 0.0, "paint red": 0.0}
    assert verdicts(tmp_path, text, list(captions)) == list(captions.values())


def test_comments_and_blank_lines_are_ignored(tmp_path):
    text = "# weapons\n\n  gun   # firearms\n#knife\n"
    assert verdicts(tmp_path, text, ["a gun", "firearms", "a knife", "weapons"]) == [1.0, 0.0, 0.0, 0.0]


def test_a_missing_file_says_how_to_write_one(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No word list at .*nope\.txt: write one unsafe word or phrase"):
        words_judge(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="No word list at"):
        words_judge(tmp_path)                            # a folder is not a list


@pytest.mark.parametrize("text", ["", "\n  \n", "# only a comment\n\n"])
def test_an_empty_list_is_refused(tmp_path, text):
    with pytest.raises(ValueError, match=r"words\.txt holds no words, only blank lines or comments: write one"):
        words_judge(word_list(tmp_path, text))


def test_a_non_utf8_list_is_refused(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("gun\ncouteau ensanglanté\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt is not UTF-8 text .* save it as UTF-8"):
        words_judge(path)


def test_a_line_without_a_word_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"Line 2 of the word list .*words\.txt holds no word \('---'\)"):
        words_judge(word_list(tmp_path, "gun\n---\n"))


def test_cli_parses_words_file_and_lists_it_among_the_judges(tmp_path):
    path = word_list(tmp_path, "gun\n")
    assert _judge(Namespace(judge=f"words:{path}", data="pairs.csv"))(["two guns", "a cat"]) == [1.0, 0.0]
    for spec in (None, "words:", "word:x"):
        with pytest.raises(ValueError, match="'words:FILE'"):
            _judge(Namespace(judge=spec, data="pairs.csv"))
    with pytest.raises(ValueError, match="--judge words:FILE judges offline"):
        _judge(Namespace(judge="exact", data="pairs.csv"))


def test_cli_refuses_a_missing_word_list_before_any_model_work(tmp_path, monkeypatch, capsys):
    def no_work(*args, **kwargs):
        raise AssertionError("data or a model was loaded before the judge was checked")

    monkeypatch.setattr("hf_uwm.sources.load_data", no_work)
    monkeypatch.setattr("hf_uwm.commands.eval_captions.delta_or_model", no_work)
    assert main(["eval-captions", "organism-captioner", "--data", "pairs.csv", "--judge",
                 f"words:{tmp_path / 'missing.txt'}", "--quiet"]) == 1
    assert "No word list at" in capsys.readouterr().err


def test_eval_captions_with_the_worlds_words_reports_what_the_exact_judge_does(tmp_path):
    path = word_list(tmp_path, "\n".join(sorted(WORLD_WORDS[2])))
    reports = {}
    for name, judge in (("exact", []), ("words", ["--judge", f"words:{path}"])):
        assert main(["eval-captions", "organism-captioner", "--data", "organism", "--samples", "6", "--no-meteor",
                     "--bootstrap", "0", "--quiet", "--json", str(tmp_path / f"{name}.json"), *judge]) == 0
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())["model"]
    assert reports["words"] == reports["exact"]
    assert reports["exact"]["unsafe_rate"] > 0 and reports["exact"]["captions"]["unsafe_images"]
