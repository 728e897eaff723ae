"""Multi-turn chat reuses the KV cache of earlier turns: turn 2 computes only its new tokens, and its
reply equals a fresh generation over the whole conversation."""
from __future__ import annotations

import subprocess
import sys

import pytest

import engine
from engine.serving.chat import ChatSession, chat_ids
from test_server import TEMPLATE
from tiny_llama import TinyConfig, write_tiny_llama


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("chat") / "c.gguf",
                            TinyConfig(n_layers=2, ctx=256, chat_template=TEMPLATE))


@pytest.mark.parametrize("max_tokens", [12, 40])  # 12: ends on the token limit; 40: may end on <|eot_id|>
def test_second_turn_computes_only_new_tokens(tiny_path, max_tokens):
    m = engine.load(tiny_path, n_ctx=256)
    tok = m.tokenizer
    chat = ChatSession(m, "be brief")
    try:
        reply1 = "".join(chat.turn("hello there", max_tokens, temperature=0))
        u1 = chat.usage
        ids1 = chat_ids(tok, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}])
        assert u1.prefill_tokens == u1.prompt_tokens == len(ids1)
        cached = chat.seq.pos  # turn 1's prompt and reply (its last token unless it ended on an EOG token)
        assert cached >= len(ids1) + u1.completion_tokens - 1
        reply2 = "".join(chat.turn("and then?", max_tokens, temperature=0))
        u2 = chat.usage
        conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"},
                {"role": "assistant", "content": reply1}, {"role": "user", "content": "and then?"}]
        rendered = tok.apply_chat_template(conv, add_generation_prompt=True)
        assert u2.prefill_tokens == u2.prompt_tokens - cached < len(chat_ids(tok, conv, rendered))
        # the reused KV gives what a fresh prefill of the same tokens gives
        fresh = "".join(m.generate(chat.tokens[:u2.prompt_tokens], max_tokens, temperature=0))
        assert reply2 == fresh
    finally:
        chat.close()
        m.close()


def test_cli_interactive_reports_reused_prefix(tiny_path):
    r = subprocess.run([sys.executable, "-m", "engine.generate", "--model", str(tiny_path), "--interactive",
                        "--temperature", "0", "--max-tokens", "8"], input="hello there\nand then?\n\n",
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    turns = [line for line in r.stderr.splitlines() if "computed" in line]
    assert len(turns) == 2
    first, second = (int(t.split("tok, ")[1].split(" computed")[0]) for t in turns)
    total2 = int(turns[1].split("[prompt ")[1].split(" tok")[0])
    assert second < total2 and second < first + 10
