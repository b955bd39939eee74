"""Prompt layouts: the head is fixed, the parts join to the rendered conversation, and the
layout is chosen by setting (no model needed: the tiny byte-level tokenizer)."""

import pytest

from server.config import Settings
from server.errors import InvalidRequest
from server.prompt import DEFAULT_LAYOUT, LAYOUTS, LayoutSpec, Passage, PromptBuilder
from tests.tiny import tiny_tokenizer

P = [Passage("a", "Zorbl", "Zorbl lives on the moon."), Passage("b", "Paris", "Paris is in France.")]
CONVERSATIONS = [
    [{"role": "user", "content": "Where does Zorbl live?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Where does Zorbl live?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
     {"role": "user", "content": "Where does Zorbl live?"}],
]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_layout_has_a_fixed_head_and_parts_that_join_to_its_prompt(name):
    tok = tiny_tokenizer()
    pb = PromptBuilder(tok, name)
    for messages in CONVERSATIONS:
        layout = pb.with_passages(messages, P)
        assert layout.head == pb.layout_head()  # `kv`'s stored caches were computed after this head
        assert layout.passages == [pb.passage_ids(p) for p in P]  # a passage's tokens ignore its neighbours
        assert layout.ids == layout.head + layout.passages[0] + layout.passages[1] + layout.tail
        text = tok.decode(layout.ids)
        assert "Zorbl lives on the moon." in text and "Where does Zorbl live?" in text
        if messages[0]["role"] == "system":
            assert "Be terse." in tok.decode(layout.tail)  # the request's system text is kept, after the passages


def test_user_instruct_puts_the_passages_in_the_user_turn_before_the_question():
    tok = tiny_tokenizer()
    pb = PromptBuilder(tok, "user-instruct")
    layout = pb.with_passages(CONVERSATIONS[0], P[:1])
    assert tok.decode(layout.head) == "<|im_start|>user\n"  # the tiny template has no default system turn
    assert tok.decode(layout.ids) == ("<|im_start|>user\nDocument: Zorbl\nZorbl lives on the moon.\n\n"
                                      "Answer the question using the documents above. Answer briefly.\n\n"
                                      "Question: Where does Zorbl live?<|im_end|>\n<|im_start|>assistant\n")
    assert Settings(prompt_layout="user-instruct").prompt_layout == "user-instruct"
    assert Settings.from_env({"KNOWMUX_PROMPT_LAYOUT": "user-instruct"}).prompt_layout == "user-instruct"


def test_the_default_layout_is_the_system_prompt_one():
    tok = tiny_tokenizer()
    assert DEFAULT_LAYOUT == "system" and Settings().prompt_layout == "system"
    layout = PromptBuilder(tok).with_passages(CONVERSATIONS[0], P[:1])
    text = tok.decode(layout.ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.")
    assert text.endswith("\n\nDocument: Zorbl\nZorbl lives on the moon.<|im_end|>\n<|im_start|>user\n"
                         "Where does Zorbl live?<|im_end|>\n<|im_start|>assistant\n")


def test_system_example_carries_its_worked_example_in_the_fixed_head():
    tok = tiny_tokenizer()
    pb = PromptBuilder(tok, "system-example")
    layout = pb.with_passages(CONVERSATIONS[0], P[:1])
    head = tok.decode(layout.head)
    assert "Question: Which village lies on the northern shore of Lake Verrin?\nAnswer: Holm" in head
    assert head.endswith("The documents for this conversation:")  # the passages follow the example, apart
    assert tok.decode(layout.passages[0]) == "\n\nDocument: Zorbl\nZorbl lives on the moon."


def test_system_shots_open_the_conversation_with_worked_exchanges_after_the_passages():
    tok = tiny_tokenizer()
    layout = PromptBuilder(tok, "system-shots").with_passages(CONVERSATIONS[2], P[:1])
    head, tail = tok.decode(layout.head), tok.decode(layout.tail)
    assert "Document: Marta Quillon\n" in head and head.endswith("the Brightwater Academy.")  # fixed, before ours
    assert tail.startswith("<|im_end|>\n<|im_start|>user\nWhich village lies on the northern shore of Lake Verrin?"
                           "<|im_end|>\n<|im_start|>assistant\nHolm<|im_end|>\n")
    # the request's own turns follow the two exchanges, in order
    assert tail.index("the Brightwater Academy<|im_end|>") < tail.index("Hi<|im_end|>") < tail.index("Hello.")
    # system-fewshot: the default's prompt with one passage; with two, exchanges carrying their own documents
    few, plain = PromptBuilder(tok, "system-fewshot"), PromptBuilder(tok, "system")
    assert few.with_passages(CONVERSATIONS[0], P[:1]) == plain.with_passages(CONVERSATIONS[0], P[:1])
    two, two_plain = few.with_passages(CONVERSATIONS[0], P), plain.with_passages(CONVERSATIONS[0], P)
    assert (two.head, two.passages) == (two_plain.head, two_plain.passages)  # the same stored KV fits both
    assert "<|im_start|>user\nDocument: Lake Verrin\n" in tok.decode(two.tail)
    # CK-PLUG's row without passages keeps the exchanges its paired row has
    bare = few.with_passages(CONVERSATIONS[0], [], shots_for=2)
    assert bare.head == two.head and bare.passages == [] and bare.tail == two.tail
    with pytest.raises(ValueError, match="system turn"):
        LayoutSpec("x", "user", None, "{text}", shots=(("q", "a"),))


def test_an_unknown_layout_and_a_conversation_with_no_user_turn_are_refused():
    with pytest.raises(ValueError, match="unknown prompt layout 'sideways'.*system, user-instruct"):
        Settings(prompt_layout="sideways")
    with pytest.raises(InvalidRequest, match="first user message"):
        PromptBuilder(tiny_tokenizer(), "user-instruct").with_passages([{"role": "assistant", "content": "Hi"}], P)
