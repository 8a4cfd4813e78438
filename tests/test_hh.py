"""rrhf_fast/pipelines/hh.py: HH-RLHF dialogues as chat conversations (the shipped fixture included),
and the real run's brevity reward."""

from pathlib import Path

import pytest

from rrhf_fast.data.records import load_examples
from rrhf_fast.pipelines.hh import brevity_reward, conversations, to_conversation, turns

FIXTURE = Path(__file__).parent / "fixtures" / "hh_rlhf" / "harmless-base-test.jsonl.gz"


def test_a_dialogue_becomes_messages_and_the_last_turn_the_answers():
    record = {
        "chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.\n\nHuman: Sky?\n\nAssistant: Blue.",
        "rejected": "\n\nHuman: Hi?\n\nAssistant: Hello.\n\nHuman: Sky?\n\nAssistant: Green, surely.",
    }
    assert to_conversation(record) == {
        "prompt": [
            {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Sky?"},
        ],
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "Green, surely."}],
    }


@pytest.mark.parametrize(
    "text",
    ["Hi", "\n\nAssistant: first", "\n\nHuman: a\n\nHuman: b", "\n\nHuman: a\n\nAssistant: "],
    ids=["no-turns", "assistant-first", "two-users", "empty-turn"],
)
def test_dialogues_that_do_not_alternate_are_refused(text):
    assert turns(text) is None


def test_the_fixture_reads_as_conversations_rrhf_fast_loads(tmp_path):
    convs = conversations(FIXTURE)
    assert 2200 < len(convs) <= 2312  # 2312 records; the few that are not clean dialogues are left out
    assert all(c["prompt"][-1]["role"] == "user" and c["chosen"] != c["rejected"] for c in convs)
    path = tmp_path / "hh.jsonl"
    import json

    path.write_text("".join(json.dumps(c) + "\n" for c in convs[:50]), encoding="utf-8")
    examples = load_examples(path)
    assert len(examples) == 50 and examples[0].scores == [1.0, 0.0]
    assert isinstance(examples[0].query, list)  # conversational: tokenised through the chat template


def test_brevity_reward():
    assert brevity_reward("q", "Yes, it is.") == 1.0
    assert brevity_reward("q", "Yes, it is") == 0.5  # cut off: no end of sentence
    assert brevity_reward("q", " ".join(["word"] * 50) + ".") == pytest.approx(0.5)
    assert brevity_reward("q", " ".join(["word"] * 80)) == 0.0
    assert brevity_reward("q", "") == 0.0
