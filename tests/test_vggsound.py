"""VGGSound list parsing: both official formats, and hostile ids and labels."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.data.vggsound import (
    ListFormatError,
    clean_label,
    clip_id,
    parse_list,
    read_classes,
    read_list,
    validate_youtube_id,
    video_url,
)

DATA = Path(__file__).parent / "data" / "vggsound"

HOSTILE_IDS = [
    "../x",
    "../../etc/pa",  # 11 characters, but with '.' and '/'
    "--exec",
    "--exec=rm -",
    ";rm -rf /;a",
    "$(reboot)xx",
    "ｕｎｉｃｏｄｅｘｘｘ",  # fullwidth letters, 11 of them
    "abcdéfghijk",
    "",
    "abcdefghij",  # 10
    "abcdefghijkl",  # 12
    "abc defghij",
    "abcdefghij\n",
]


def test_real_test_csv_parses_completely():
    parsed = read_list(DATA / "test.csv", split="test")
    assert parsed.format == "split"
    assert len(parsed.entries) == 15_446
    assert parsed.rejected == ()
    assert len({e.label for e in parsed.entries}) == 309
    assert {e.split for e in parsed.entries} == {"test"}
    names = [line.split(",", 1)[0] for line in (DATA / "test.csv").read_text().splitlines()]
    assert [f"{e.clip_id}.mp4" for e in parsed.entries] == names
    first = parsed.entries[0]
    assert (first.youtube_id, first.start_s, first.label) == (
        "glLQrEijrKg",
        300,
        "playing hammond organ",
    )
    assert not any("\r" in e.label or e.label != e.label.strip() for e in parsed.entries)


def test_test_csv_labels_are_the_stat_csv_classes():
    classes = read_classes(DATA / "stat.csv")
    assert len(classes) == 309
    assert sum(c.count for c in classes) == 199_176
    assert classes[2].label == "bird chirping, tweeting"
    assert len({c.category for c in classes}) == 9
    labels = {e.label for e in read_list(DATA / "test.csv", split="train").entries}
    assert labels == {c.label for c in classes}


def test_split_format_takes_the_callers_split():
    parsed = parse_list("abcdefghijk_000012.mp4,dog barking\r\n", split="train")
    assert [(e.clip_id, e.split) for e in parsed.entries] == [("abcdefghijk_000012", "train")]


VGGSOUND_SAMPLE = (
    "---g-f_I2yQ,1,people marching,test\n"
    '--0PQM4-hqg,30,"female speech, woman speaking",train\n'
    '-0-0XTD_0q0,0,"engine accelerating, revving, vroom",train\n'
    "abcdefghijk,7, dog barking ,TEST\n"
    "---g-f_I2yQ,1,people marching,test\n"  # duplicate (youtube_id, start)
    "---g-f_I2yQ,2,people marching,test\n"  # same video, another start: kept
)


def test_vggsound_format_with_quoted_labels_and_dash_ids(tmp_path):
    path = tmp_path / "vggsound.csv"
    path.write_bytes(VGGSOUND_SAMPLE.replace("\n", "\r\n").encode())
    parsed = read_list(path, split="train")  # the rows' own split wins in this format
    assert parsed.format == "vggsound"
    got = [(e.youtube_id, e.start_s, e.label, e.split, e.clip_id) for e in parsed.entries]
    assert got == [
        ("---g-f_I2yQ", 1, "people marching", "test", "---g-f_I2yQ_000001"),
        ("--0PQM4-hqg", 30, "female speech, woman speaking", "train", "--0PQM4-hqg_000030"),
        ("-0-0XTD_0q0", 0, "engine accelerating, revving, vroom", "train", "-0-0XTD_0q0_000000"),
        ("abcdefghijk", 7, "dog barking", "test", "abcdefghijk_000007"),
        ("---g-f_I2yQ", 2, "people marching", "test", "---g-f_I2yQ_000002"),
    ]
    assert [(r.line, "duplicate" in r.reason) for r in parsed.rejected] == [(5, True)]


@pytest.mark.parametrize("bad_id", HOSTILE_IDS)
def test_hostile_ids_are_rejected_in_both_formats(bad_id):
    good = "abcdefghijk,1,dog,train\n"
    row = f'"{bad_id}",5,dog,train\n'
    parsed = parse_list(good + row, split="train")
    assert [e.youtube_id for e in parsed.entries] == ["abcdefghijk"]
    assert len(parsed.rejected) == 1 and parsed.rejected[0].line == 2
    assert "line 2" in parsed.rejected[0].reason

    parsed = parse_list(
        f'abcdefghijk_000001.mp4,dog\r\n"{bad_id}_000005.mp4",dog\r\n', split="test"
    )
    assert [e.youtube_id for e in parsed.entries] == ["abcdefghijk"]
    assert [r.line for r in parsed.rejected] == [2]


@pytest.mark.parametrize("bad_id", HOSTILE_IDS)
def test_hostile_ids_never_reach_a_url_or_a_clip_id(bad_id):
    with pytest.raises(ValueError, match="not a YouTube id"):
        video_url("https://www.youtube.com/watch?v={id}", bad_id)
    with pytest.raises(ValueError):
        clip_id(bad_id, 0)


def test_dash_ids_are_valid_and_stay_inside_the_url():
    assert validate_youtube_id("--0PQM4-hqg") == "--0PQM4-hqg"
    url = video_url("https://www.youtube.com/watch?v={id}", "-----exec--")
    assert url == "https://www.youtube.com/watch?v=-----exec--"
    # only {id} is substituted: other braces in the template are left alone
    assert video_url("http://h/{id}.mp4?x={y}", "abcdefghijk") == "http://h/abcdefghijk.mp4?x={y}"


@pytest.mark.parametrize(
    "label",
    [
        "",
        "   ",
        "\x00dog",
        "dog\x1b[31m",
        "dog\tbark",
        "left\u202eright",
        "zero\u200bwidth",
        "x" * 201,
    ],
)
def test_hostile_labels_are_rejected(label):
    with pytest.raises(ValueError):
        clean_label(label)
    parsed = parse_list(f'abcdefghijk,1,dog,train\nbcdefghijkl,1,"{label}",train\n', split="train")
    assert len(parsed.entries) == 1 and [r.line for r in parsed.rejected] == [2]


def test_unicode_labels_are_kept_and_normalised():
    assert clean_label("  café au lait  ") == "café au lait"
    assert clean_label("cafe\u0301") == "café"  # NFD input, NFC output
    assert clean_label("гитара") == "гитара"


@pytest.mark.parametrize("start", ["-1", "1.5", "1e3", "", "١٢", "1234567", " 3x"])
def test_bad_start_seconds_are_rejected(start):
    parsed = parse_list(f"abcdefghijk,1,dog,train\nbcdefghijkl,{start},dog,train\n", split="train")
    assert len(parsed.entries) == 1 and len(parsed.rejected) == 1


def test_bad_split_and_field_count_are_rejected_per_line():
    parsed = parse_list(
        "abcdefghijk,1,dog,train\nbcdefghijkl,1,dog,valid\ncdefghijklm,1,dog\n", split="train"
    )
    assert [r.line for r in parsed.rejected] == [2, 3]
    assert "split" in parsed.rejected[0].reason and "4 fields" in parsed.rejected[1].reason


def test_unrecognisable_file_fails_with_the_line():
    with pytest.raises(ListFormatError, match="line 1"):
        parse_list("a,b,c\n", split="train")
    with pytest.raises(ListFormatError, match="no rows"):
        parse_list("\n\n", split="train")
