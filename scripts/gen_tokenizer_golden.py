#!/usr/bin/env python3
"""Writes tests/data/tokenizer/{smollm2,gemma3}.json: texts and the token ids an independent
implementation (Hugging Face `tokenizers`, built by transformers' GGUF tokenizer converter) gives
them. Dev-time only; CI never runs this.

    pip install gguf transformers tokenizers sentencepiece protobuf   # torch is not needed
    python3 scripts/gen_tokenizer_golden.py [--check-spm] [MODEL_DIR]

MODEL_DIR defaults to ${TQKV_CACHE_DIR:-~/.cache/tqkv}/models (scripts/fetch-models.sh fills it).

Why not AutoTokenizer.from_pretrained(dir, gguf_file=...): transformers' GGUF file reader imports
torch. Its tokenizer converter does not, so the metadata is read with the `gguf` package and handed
to transformers.integrations.gguf.gguf_tokenizer_mapping.convert_gguf_tokenizer, which is what
from_pretrained would call. Two corrections, each where the converter departs from both llama.cpp
and the model's own tokenizer:

- SmolLM2: the converter knows no pre-tokenizer for tokenizer.ggml.pre = "smollm" and falls back
  to plain GPT-2 splitting, while SmolLM2's tokenizer.json (and llama.cpp) first isolate every
  digit: "a  1" must split as ["a", "  ", "1"], not ["a", " ", " 1"].
- Gemma 3: the converter respells the user-defined whitespace-run tokens ("  " .. 31 spaces) as
  U+2581 runs but leaves them out of the added tokens, so BPE merges cut 40 spaces into 16 + 24;
  llama.cpp and SentencePiece match them whole (31 + 9). They are added back as added tokens.

With --check-spm the Gemma ids are also compared against the `sentencepiece` library running a
model built from the same GGUF metadata; they must agree on every text without control tokens
(SentencePiece never reads control tokens from text) and on the whole GPL-3.
"""
import json
import os
import sys

import gguf
from tokenizers import AddedToken, pre_tokenizers
from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

GPL = "/usr/share/common-licenses/GPL-3"

MODELS = {
    "smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma3": "gemma-3-270m-q4_k_m.gguf",
}


def read_metadata(path):
    reader = gguf.GGUFReader(path)
    out = {}
    for key, field in reader.fields.items():
        types = field.types
        if types[0] == gguf.GGUFValueType.ARRAY:
            if len(types) > 1 and types[1] == gguf.GGUFValueType.STRING:
                out[key] = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
            else:
                out[key] = [field.parts[i][0].item() for i in field.data]
        elif types[0] == gguf.GGUFValueType.STRING:
            out[key] = bytes(field.parts[field.data[0]]).decode("utf-8")
        else:
            out[key] = field.parts[field.data[0]][0].item()
    return out


def build(path):
    md = read_metadata(path)
    tok = {name: md["tokenizer." + key] for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items() if "tokenizer." + key in md}
    backend, _ = convert_gguf_tokenizer(md["general.architecture"], tok)
    if md.get("tokenizer.ggml.pre") == "smollm":
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True),
             pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    if md["general.architecture"].startswith("gemma"):
        runs = [t.replace(" ", "\u2581") for t, ty in zip(md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"])
                if ty == 4 and t and not t.strip(" ")]
        before = backend.get_vocab_size()
        backend.add_tokens([AddedToken(r, normalized=True, special=False) for r in runs])
        assert backend.get_vocab_size() == before, "whitespace tokens must map onto existing ids"
    return backend, md


def sentencepiece_ids(md, texts):
    """Ids from the sentencepiece library, for a BPE model made of the file's pieces."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.vocab_size = len(md["tokenizer.ggml.tokens"])
    m.trainer_spec.split_by_whitespace = False
    m.trainer_spec.unk_id = md["tokenizer.ggml.unknown_token_id"]
    m.trainer_spec.bos_id = md["tokenizer.ggml.bos_token_id"]
    m.trainer_spec.eos_id = md["tokenizer.ggml.eos_token_id"]
    m.trainer_spec.pad_id = md["tokenizer.ggml.padding_token_id"]
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", False))
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    for t, score, ty in zip(md["tokenizer.ggml.tokens"], md["tokenizer.ggml.scores"], md["tokenizer.ggml.token_type"]):
        p = m.pieces.add()
        # GGUF stores user-defined whitespace runs as real spaces; SentencePiece spells them with U+2581.
        p.piece = t.replace(" ", "\u2581") if ty == 4 and t and not t.strip(" ") else t
        p.score = score
        p.type = ty  # GGUF token types are SentencePiece's piece types
    sp = spm.SentencePieceProcessor(model_proto=m.SerializeToString())
    return [sp.encode(t) for t in texts]


def texts():
    gpl = open(GPL, encoding="utf-8").read()
    return [
        "",
        "Hello world",
        "Hello, world! How are you today?",
        "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times; "
        "it was the age of wisdom, it was the age of foolishness.",
        "I'm sure they'll say it's what we'd've done, don't you think? IT'S 'S ’s",
        "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
        "int main(void) {\n\tfor (int i = 0; i < 10; ++i) printf(\"%d\\n\", i);\n\treturn 0;\n}",
        "12345 3.14159",
        "In 2024, 1,000,000 people paid $3.50 each (approx. 3,20 EUR); x=0x1F, 1e-9.",
        "a  1 x   2024 7",
        "Wait... what?!?! --- *** ((())) [[]] {{}} !!! ??? ;;; ::",
        "a  b   c    d     e",
        "\tindented\t\ttabs\t",
        "line1\nline2\n\nline3\r\nline4\n\n\n",
        "   leading and trailing   ",
        " ",
        "     ",
        "\n",
        "x" + " " * 40 + "y",
        "Café naïve résumé façade — Ærøskøbing, Straße, Ångström",
        "Cafe\u0301 and Z\u0364\u0354\u0367\u0311a\u0308\u0356\u032dl\u036e\u0312\u036b",
        "你好，世界！日本語のテキスト。한국어 텍스트",
        "Привет, мир! Γειά σου κόσμε. مرحبا بالعالم नमस्ते दुनिया",
        "I ❤️ 🦙 and 👨‍👩‍👧‍👦! 😀😃😄",
        "∑_{i=1}^{n} i² = n(n+1)/2 ≥ 0 ± ∞; Ⅻ ² ٣ ௫",
        "rare: 𠀀𠀁 \ue000 \U0010fffd",
        "control: \x00\x01\x07\x7f end",
        "no\u00a0break\u3000ideographic\u2003em\u0085nel",
        "https://example.com/path?q=1&x=y user@example.org",
        "{\"key\": [1, 2.5, null, true], \"s\": \"x\\\"y\"}",
        "# Title\n\n- item **bold** _it_\n```python\nprint('hi')\n```\n",
        "HELLO World hello WORLD hElLo",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
        "<|endoftext|>tail",
        "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n",
        "<bos>text<eos> <pad>",
        "partial <|im_start <start_of_turn and <0x41> <unk>",
        "<table><tr><td>x</td></tr></table> <b>bold</b>",
        gpl[:3000],
        gpl[20000:21500],
    ]


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    model_dir = args[0] if args else os.path.join(
        os.environ.get("TQKV_CACHE_DIR", os.path.expanduser("~/.cache/tqkv")), "models")
    for short, fname in MODELS.items():
        backend, md = build(os.path.join(model_dir, fname))
        cases = [{"text": t, "ids": backend.encode(t, add_special_tokens=False).ids} for t in texts()]
        if "--check-spm" in sys.argv and md.get("tokenizer.ggml.model") == "llama":
            gpl = open(GPL, encoding="utf-8").read()
            control = [t for t, ty in zip(md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"]) if ty == 3]
            plain = [c for c in cases if not any(t in c["text"] for t in control)]
            got = sentencepiece_ids(md, [c["text"] for c in plain] + [gpl])
            for c, ids in zip(plain, got):
                assert ids == c["ids"], f"sentencepiece disagrees on {c['text']!r}: {ids} vs {c['ids']}"
            assert got[-1] == backend.encode(gpl, add_special_tokens=False).ids, "sentencepiece disagrees on GPL-3"
            print(f"{short}: sentencepiece agrees on {len(plain)} texts without control tokens and on GPL-3")
        doc = {
            "model_file": fname,
            "source": "transformers " + __import__("transformers").__version__ + " convert_gguf_tokenizer + tokenizers "
                      + __import__("tokenizers").__version__ + ("; pre-tokenizer Digits(individual)+ByteLevel"
                                                                 if md.get("tokenizer.ggml.pre") == "smollm" else ""),
            "add_bos": bool(md.get("tokenizer.ggml.add_bos_token", False)),
            "bos": md.get("tokenizer.ggml.bos_token_id", -1),
            "eos": md.get("tokenizer.ggml.eos_token_id", -1),
            "cases": cases,
        }
        out = os.path.join(root, "tests", "data", "tokenizer", short + ".json")
        # One case per line keeps diffs of regenerated files readable.
        head = {k: v for k, v in doc.items() if k != "cases"}
        lines = [json.dumps(c, ensure_ascii=True, separators=(",", ":")) for c in cases]
        with open(out, "w", encoding="utf-8") as f:
            f.write(json.dumps(head, ensure_ascii=True)[:-1] + ', "cases": [\n' + ",\n".join(lines) + "\n]}\n")
        json.load(open(out, encoding="utf-8"))
        print(out, len(cases), "texts")


if __name__ == "__main__":
    main()
