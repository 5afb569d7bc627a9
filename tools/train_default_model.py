"""Train the small default model shipped in refimpl/data/default/ (a dev tool, not package code).

    . .venv/bin/activate
    python tools/train_default_model.py                # corpus, tokenizer, 10-15 min CPU training
    python tools/train_default_model.py --check-only   # reload the saved model and generate

What it does, all offline and seeded:

1. Corpus: the docstrings of the Python standard library on this machine (module docs, and
   those of public functions, classes and methods, with signatures), the Zen of Python, a few
   Chinese sentences, and chat conversations in the openPangu template generated from the same
   docstrings ("What does the json module do?" -> the docstring's first sentence), plus
   hand-written ones ("Briefly, what is a language model?", 你好, ...).
2. Tokenizer: a SentencePiece BPE model (identity normalisation, no dummy prefix, whitespace
   kept, byte fallback) with ``<unk>``=0, ``<s>``=1, ``</s>``=2 and the openPangu special
   pieces ``<|User|>:``, ``<|Bot|>:``, ``[unused0]``..``[unused10]`` as user-defined symbols.
3. Model: a transformers ``LlamaForCausalLM`` shaped like openPangu-Embedded (GQA, q/k/v/o
   biases, tied embeddings, rotate-half RoPE with theta 4e6, RMSNorm eps 1e-5, SwiGLU, no MLP
   bias), trained on CPU with one thread (AdamW, warm-up then cosine decay).
4. Output: ``config.json`` in the PanguEmbedded format, ``model.safetensors`` in bfloat16
   with the MODEL-SPEC tensor names (no ``lm_head.weight``), ``tokenizer.model``,
   ``tokenizer_config.json`` and ``generation_config.json``.
5. Check: reload the saved bf16 weights into a fresh LlamaForCausalLM and greedy-generate.

Every training sequence is ``<s> ... [unused10]``: a chat ends with the assistant's turn end,
and a plain document ends with the same eos id, so generation stops at the end of a docstring.
"""

from __future__ import annotations

import argparse
import ast
import codecs
import importlib
import importlib.util
import inspect
import io
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
import warnings
import contextlib

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if importlib.util.find_spec("refimpl") is None:   # not installed: run from the checkout
    sys.path.insert(0, ROOT)   # (installed, keep ROOT off the path: its kernels/ would shadow
                               # the `kernels` package transformers probes for)

from refimpl.tokenizer import Tokenizer, chat_template  # noqa: E402

DEFAULT_OUT = os.path.join(ROOT, "refimpl", "data", "default")
SPECIAL_PIECES = ["<|User|>:", "<|Bot|>:"] + [f"[unused{i}]" for i in range(11)]

MODEL_SHAPE = dict(hidden_size=256, intermediate_size=640, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                   rms_norm_eps=1e-5, rope_theta=4_000_000.0, max_position_embeddings=2048)

#: --draft: the speculative-decoding draft model shipped in refimpl/data/default-draft/, same
#: tokenizer (copied from the default model, not retrained), about a quarter of the size
DRAFT_SHAPE = dict(MODEL_SHAPE, hidden_size=128, intermediate_size=320, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1)
DRAFT_OUT = os.path.join(ROOT, "refimpl", "data", "default-draft")

# modules never imported: side effects (a browser, a window, printing) or platform-only
SKIP_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test",
                "lib2to3", "msvcrt", "winreg", "winsound", "nturl2path", "ntpath", "_winapi",
                "ensurepip", "venv", "pydoc_data", "xxsubtype", "xxlimited", "__main__"}


# ---------------------------------------------------------------------- corpus
def _clean(doc: str) -> str:
    doc = inspect.cleandoc(doc)
    doc = re.sub(r"\n{3,}", "\n\n", doc)
    return doc.strip()


def first_sentence(doc: str, limit: int = 240) -> str | None:
    """The first sentence of a docstring's first paragraph, whitespace collapsed."""
    para = doc.strip().split("\n\n")[0]
    para = " ".join(para.split())
    if not para or para.startswith((">>>", "..", "Usage")):
        return None
    m = re.match(r"(.+?[.!?])(\s|$)", para)
    sentence = m.group(1) if m else para
    if len(sentence) < 12 or len(sentence) > limit or "(" in sentence[:1]:
        return None
    return sentence


def _signature(obj) -> str:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""
    if " at 0x" in sig or len(sig) > 120:
        return ""
    return sig


def _import(name):
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except BaseException:  # noqa: BLE001 - any import failure just skips the module
            return None


def stdlib_docs():
    """(documents, module first sentences, function first sentences) from the stdlib."""
    names = sorted(n for n in sys.stdlib_module_names
                   if not n.startswith("_") and n not in SKIP_MODULES)
    # a few well-known submodules
    names += ["os.path", "email.message", "email.utils", "json.decoder", "json.encoder",
              "logging.handlers", "urllib.parse", "urllib.request", "xml.etree.ElementTree",
              "concurrent.futures", "importlib.resources", "unittest.mock",
              "collections.abc", "http.client", "http.server", "multiprocessing.pool",
              "asyncio.tasks", "asyncio.queues", "sqlite3.dbapi2", "html.parser",
              "wsgiref.simple_server", "xml.dom.minidom", "dbm.dumb"]
    docs, module_sentences, function_sentences = [], [], []
    seen = set()
    default_docs = {_clean(object.__init__.__doc__ or ""), _clean(object.__doc__ or "")}

    def add(title, doc):
        doc = _clean(doc)
        if len(doc) < 20 or doc in seen or doc in default_docs:
            return None
        seen.add(doc)
        docs.append(f"{title}\n{doc}" if title else doc)
        return doc

    for name in names:
        mod = _import(name)
        if mod is None:
            continue
        if isinstance(mod.__doc__, str):
            doc = add(f"Module {name}", mod.__doc__)
            s = first_sentence(doc) if doc else None
            if s:
                module_sentences.append((name, s))
        public = getattr(mod, "__all__", None)
        if not isinstance(public, (list, tuple)):
            public = [n for n in dir(mod) if not n.startswith("_")]
        for attr in public:
            obj = getattr(mod, attr, None)
            if obj is None or getattr(obj, "__module__", None) not in (name, "_" + name,
                                                                          name.split(".")[-1]):
                if not (inspect.isbuiltin(obj) and name in ("math", "time", "os", "sys")):
                    continue
            if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
                continue
            if not isinstance(getattr(obj, "__doc__", None), str):
                continue
            qual = f"{name}.{attr}"
            doc = add(f"{qual}{_signature(obj)}", obj.__doc__)
            s = first_sentence(doc) if doc else None
            if s:
                function_sentences.append((qual, "class" if inspect.isclass(obj) else "function",
                                           s))
            if inspect.isclass(obj):
                for meth_name, meth in sorted(vars(obj).items()):
                    if meth_name.startswith("_") or not callable(meth):
                        continue
                    mdoc = getattr(meth, "__doc__", None)
                    if isinstance(mdoc, str):
                        d = add(f"{qual}.{meth_name}{_signature(meth)}", mdoc)
                        s = first_sentence(d) if d else None
                        if s:
                            function_sentences.append((f"{qual}.{meth_name}", "method", s))
    return docs, module_sentences, function_sentences


def zen_of_python() -> str:
    """The Zen of Python, read from this.py's source without importing it (it prints)."""
    spec = importlib.util.find_spec("this")
    with open(spec.origin, encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "s":
            return codecs.decode(node.value.value, "rot13")
    return ""


CHINESE_TEXT = [
    "你好！我是一个很小的语言模型，用 Python 标准库的文档训练而成。",
    "对话模板里有五种角色：系统、用户、助手、工具和方法。",
    "系统消息说明助手应该怎样回答；用户消息是用户的问题；助手消息是模型的回答。",
    "工具消息是工具调用的结果，方法消息是函数调用的结果。",
    "每一条消息都以 [unused9] 开始，以 [unused10] 结束，角色名后面是全角冒号：。",
    "语言模型根据前面的文字预测下一个词元。",
    "Python 是一种简单易学、功能强大的编程语言。",
    "标准库提供了很多模块，例如 os、sys、json 和 re。",
    "盘古模型是一个大型语言模型系列；这个小模型只是它的结构的一个缩小版。",
    "今天天气很好。我们一起学习 Python 吧。",
]

# hand-written conversations: (question paraphrases, answer)
HANDWRITTEN_CHATS = [
    (["Briefly, what is a language model?", "What is a language model?",
      "Explain what a language model is.", "What's a language model?"],
     "A language model is a program that predicts the next token of a text from the tokens "
     "before it; by repeating that prediction it can write text."),
    (["Who are you?", "What are you?", "Introduce yourself."],
     "I am a tiny demonstration model of refimpl, trained on the documentation of the Python "
     "standard library. I know a little about Python modules."),
    (["Hello", "Hello!", "Hi", "Hi there!", "Good morning"],
     "Hello! Ask me about a Python module, for example: What does the json module do?"),
    (["What can you do?", "How can you help me?"],
     "I can tell you what a module or function of the Python standard library does, in one "
     "sentence."),
    (["What is Python?", "Briefly, what is Python?"],
     "Python is a programming language that lets you work quickly and integrate systems "
     "effectively."),
    (["What is the Zen of Python?"],
     "Beautiful is better than ugly. Explicit is better than implicit. Simple is better than "
     "complex."),
    (["Thank you!", "Thanks"], "You are welcome!"),
    (["你好", "你好！", "您好"], "你好！我是一个很小的语言模型。你可以问我 Python 标准库的问题。"),
    (["你是谁？", "请介绍一下你自己。"],
     "我是 refimpl 的默认小模型，用 Python 标准库的文档训练而成。"),
    (["什么是语言模型？", "语言模型是什么？"], "语言模型根据前面的文字预测下一个词元。"),
    (["对话模板有哪些角色？"], "系统、用户、助手、工具和方法。"),
    (["谢谢"], "不客气！"),
]

MODULE_QUESTIONS = ["What does the {m} module do?", "What is the Python module {m} for?",
                    "Tell me about the {m} module.", "Briefly, what is {m}?",
                    "What is {m} used for in Python?", "{m} 模块是做什么的？"]
FUNCTION_QUESTIONS = ["What does {f} do?", "Explain {f}.", "What is {f} for?",
                      "Briefly, what does the {k} {f} do?", "{f} 是做什么的？"]
SYSTEM_PROMPTS = ["", "", "", "You are a helpful assistant.", "你是一个乐于助人的助手。",
                  "Answer in one sentence."]


def chat_examples(module_sentences, function_sentences, rng: random.Random, n_functions: int):
    """Conversations (lists of messages) in the openPangu chat format."""
    chats = []

    def conv(question, answer):
        system = rng.choice(SYSTEM_PROMPTS)
        msgs = [{"role": "system", "content": system}] if system or rng.random() < 0.3 else []
        return msgs + [{"role": "user", "content": question},
                       {"role": "assistant", "content": answer}]

    for questions, answer in HANDWRITTEN_CHATS:
        for q in questions:
            for _ in range(10):
                chats.append(conv(q, answer))
    for m, s in module_sentences:
        for q in rng.sample(MODULE_QUESTIONS, 3):
            chats.append(conv(q.format(m=m), s))
    picked = rng.sample(function_sentences, min(n_functions, len(function_sentences)))
    for f, kind, s in picked:
        chats.append(conv(rng.choice(FUNCTION_QUESTIONS).format(f=f, k=kind), s))
    # a few multi-turn conversations
    for _ in range(200):
        (m1, s1), (m2, s2) = rng.sample(module_sentences, 2)
        c = conv(rng.choice(MODULE_QUESTIONS).format(m=m1), s1)
        c += [{"role": "user", "content": rng.choice(["And {m}?", "What about {m}?"])
               .format(m=m2)}, {"role": "assistant", "content": s2}]
        chats.append(c)
    rng.shuffle(chats)
    return chats


def language_reference() -> list:
    """The topics of the Python language reference shipped for pydoc (pydoc_data.topics)."""
    from pydoc_data.topics import topics

    # drop the reStructuredText heading underlines ("*****", "=====") the topics keep
    underline = re.compile(r"^[ \t]*([*=~^-])\1{2,}[ \t]*\n", re.M)
    return [_clean(underline.sub("", topics[k])) for k in sorted(topics)]


def build_corpus(seed: int, n_function_chats: int = 4000):
    """(documents, conversations) of the training corpus."""
    rng = random.Random(seed)
    docs, module_sentences, function_sentences = stdlib_docs()
    docs += language_reference()
    docs.append("The Zen of Python, by Tim Peters\n\n" + zen_of_python())
    docs += CHINESE_TEXT
    chats = chat_examples(module_sentences, function_sentences, rng, n_function_chats)
    return docs, chats




# ---------------------------------------------------------------------- tokenizer
def train_tokenizer(docs, chats, out_dir: str, vocab_size: int) -> Tokenizer:
    """Train tokenizer.model into out_dir (BPE, byte fallback, openPangu special pieces)."""
    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        with open(corpus, "w", encoding="utf-8") as fh:
            for text in docs + [chat_template(c, False) for c in chats]:
                for line in text.split("\n"):
                    if line.strip():
                        fh.write(line + "\n")
        prefix = os.path.join(tmp, "tok")
        spm.SentencePieceTrainer.train(
            input=corpus, model_prefix=prefix, model_type="bpe", vocab_size=vocab_size,
            character_coverage=1.0, byte_fallback=True, split_digits=True,
            normalization_rule_name="identity", add_dummy_prefix=False,
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            max_sentence_length=16384, shuffle_input_sentence=False, num_threads=1,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=SPECIAL_PIECES,
            minloglevel=2)
        os.makedirs(out_dir, exist_ok=True)
        shutil.copy(prefix + ".model", os.path.join(out_dir, "tokenizer.model"))
    return Tokenizer(os.path.join(out_dir, "tokenizer.model"))


def token_stream(tok: Tokenizer, docs, chats, chat_repeats: int, seed: int) -> np.ndarray:
    """All training sequences, each ``<s> ... [unused10]``, shuffled and concatenated."""
    eos = tok.eos_id
    seqs = [tok.encode(d) + [eos] for d in docs]
    # encode_chat(..., add_generation_prompt=False) already ends with the last turn's [unused10]
    seqs += [tok.encode_chat(c, add_generation_prompt=False) for c in chats] * chat_repeats
    random.Random(seed).shuffle(seqs)
    return np.fromiter((t for s in seqs for t in s), dtype=np.int64)


# ---------------------------------------------------------------------- model
def llama_config(vocab_size: int, eos_id: int):
    from transformers import LlamaConfig

    shape = MODEL_SHAPE
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_key_value_heads"], head_dim=shape["head_dim"],
        hidden_act="silu", max_position_embeddings=shape["max_position_embeddings"],
        rms_norm_eps=shape["rms_norm_eps"], rope_theta=shape["rope_theta"],
        rope_parameters={"rope_type": "default", "rope_theta": shape["rope_theta"]},
        attention_bias=True, mlp_bias=False, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=eos_id, pad_token_id=0)


def train(model, data: np.ndarray, steps: int, batch: int, seq_len: int, lr: float,
          seed: int, autocast: bool = True, log_every: int = 25,
          max_minutes: float = 30.0) -> dict:
    """AdamW with linear warm-up and cosine decay to lr/10 on random windows of `data`;
    float32 master weights, matrix products in bfloat16 under autocast (about 1.8x faster
    on one CPU core with avx512_bf16)."""
    import torch

    gen = np.random.default_rng(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)
    warmup = max(1, steps // 20)

    def lr_at(step):
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    model.train()
    start = time.time()
    smooth = None
    losses = []
    for step in range(steps):
        starts = gen.integers(0, len(data) - seq_len - 1, size=batch)
        x = torch.from_numpy(np.stack([data[s:s + seq_len + 1] for s in starts]))
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        # labels = inputs: transformers shifts them itself (position t predicts token t+1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        value = float(loss.detach())
        losses.append(value)
        smooth = value if smooth is None else 0.95 * smooth + 0.05 * value
        elapsed = time.time() - start
        if step % log_every == 0 or step == steps - 1:
            print(f"step {step:5d}/{steps}  loss {value:.3f}  (smoothed {smooth:.3f})  "
                  f"lr {lr_at(step):.2e}  {elapsed / 60:.1f} min", flush=True)
        if elapsed > max_minutes * 60:
            print(f"stopping at step {step}: over {max_minutes} minutes", flush=True)
            break
    model.eval()
    tail = losses[-50:]
    return {"steps": len(losses), "final_loss": losses[-1],
            "final_loss_mean_last_50": sum(tail) / len(tail), "seconds": time.time() - start,
            "tokens": len(losses) * batch * seq_len}


# ---------------------------------------------------------------------- saving
def spec_weight_names(n_layers: int) -> set:
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        names |= {f"{p}self_attn.{m}_proj.{w}" for m in "qkvo" for w in ("weight", "bias")}
        names |= {f"{p}mlp.{m}_proj.weight" for m in ("gate", "up", "down")}
    return names


def save_model(model, tok: Tokenizer, out_dir: str) -> None:
    """config.json (PanguEmbedded), model.safetensors (bf16, MODEL-SPEC names, no lm_head),
    tokenizer_config.json and generation_config.json; tokenizer.model is already there."""
    import torch
    from safetensors.torch import save_file

    shape = MODEL_SHAPE
    state = {k: v.detach().to(torch.bfloat16).contiguous().clone()
             for k, v in model.state_dict().items() if k != "lm_head.weight"}
    expected = spec_weight_names(shape["num_hidden_layers"])
    if set(state) != expected:
        raise SystemExit(f"weight names differ from MODEL-SPEC: extra {set(state) - expected}, "
                         f"missing {expected - set(state)}")
    save_file(dict(sorted(state.items())), os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    config = {
        "architectures": ["PanguEmbeddedForCausalLM"], "model_type": "PanguEmbedded",
        "hidden_size": shape["hidden_size"], "intermediate_size": shape["intermediate_size"],
        "num_hidden_layers": shape["num_hidden_layers"],
        "num_attention_heads": shape["num_attention_heads"],
        "num_key_value_heads": shape["num_key_value_heads"], "head_dim": shape["head_dim"],
        "rms_norm_eps": shape["rms_norm_eps"], "rope_theta": shape["rope_theta"],
        "max_position_embeddings": shape["max_position_embeddings"],
        "vocab_size": tok.vocab_size, "tie_word_embeddings": True, "bias": True,
        "hidden_act": "silu", "bos_token_id": tok.bos_id, "pad_token_id": 0,
        "eos_token_id": tok.eos_id, "torch_dtype": "bfloat16"}
    _write_json(os.path.join(out_dir, "config.json"), config)
    _write_json(os.path.join(out_dir, "tokenizer_config.json"),
                {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
                 "eos_token": "[unused10]", "pad_token": "<unk>", "unk_token": "<unk>",
                 "model_max_length": shape["max_position_embeddings"]})
    _write_json(os.path.join(out_dir, "generation_config.json"),
                {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": 0,
                 "do_sample": False})


def _write_json(path, d):
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(d, fh, indent=2, ensure_ascii=False)
        fh.write("\n")


# ---------------------------------------------------------------------- check
CHECK_PROMPTS = ["Return the", "The json module", "Module os\n"]
CHECK_CHATS = ["Briefly, what is a language model?", "What does the json module do?",
               "What does os.path.join do?", "你好"]


def load_saved(out_dir: str):
    """A float32 LlamaForCausalLM holding the saved bf16 weights of out_dir."""
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    with open(os.path.join(out_dir, "config.json"), encoding="utf-8") as fh:
        cfg = json.load(fh)
    model = LlamaForCausalLM(llama_config(cfg["vocab_size"], cfg["eos_token_id"]))
    saved = load_file(os.path.join(out_dir, "model.safetensors"))
    state = {k: v.float() for k, v in saved.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise SystemExit(f"reload: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model.eval()


def greedy(model, ids: list, max_new: int, eos: int) -> list:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False,
                             eos_token_id=eos, pad_token_id=0)
    return out[0, len(ids):].tolist()


def check(out_dir: str, max_new: int = 40) -> None:
    """Reload the saved weights with transformers and greedy-generate a few prompts."""
    model = load_saved(out_dir)
    tok = Tokenizer.from_dir(out_dir)
    print(f"reloaded {out_dir}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"vocab {tok.vocab_size}, eos {tok.eos_id}")
    for prompt in CHECK_PROMPTS:
        new = greedy(model, tok.encode(prompt), max_new, tok.eos_id)
        print(f"--- {prompt!r}\n{prompt}{tok.decode(new)}")
    for question in CHECK_CHATS:
        new = greedy(model, tok.encode_chat([{"role": "user", "content": question}]), max_new,
                     tok.eos_id)
        print(f"--- chat {question!r}\n{tok.decode(new)}")
    cross_check(model, tok, out_dir, max_new)


def cross_check(model, tok: Tokenizer, out_dir: str, max_new: int) -> None:
    """Load the folder with refimpl's own NumPy model (fp32) and compare with transformers:
    the logits of a chat prompt and the greedy continuation."""
    import torch

    from refimpl.io.checkpoint import load_model
    from refimpl.generate import generate

    ids = tok.encode_chat([{"role": "user", "content": CHECK_CHATS[0]}])
    ours = load_model(out_dir, numerics="fp32")
    logits = np.asarray(ours.forward(np.asarray(ids)), dtype=np.float64)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].double().numpy()
    err = np.max(np.abs(logits - ref)) / np.max(np.abs(ref))
    new_ours = [int(t) for t in generate(ours, ids, max_new_tokens=max_new, eos_id=tok.eos_id)]
    new_ref = greedy(model, ids, max_new, tok.eos_id)
    print(f"refimpl NumPy fp32 vs transformers: logits max rel err {err:.2e}; greedy "
          f"continuation {'identical' if new_ours == new_ref else 'DIFFERENT'} "
          f"({len(new_ours)} tokens)")


# ---------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=550,
                    help="optimizer steps of batch x seq-len tokens (550: 10-15 min on one "
                         "core)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--chat-repeats", type=int, default=2,
                    help="how many times each conversation appears in the token stream")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the box is shared)")
    ap.add_argument("--no-autocast", action="store_true",
                    help="train in float32 throughout (about half the speed)")
    ap.add_argument("--max-minutes", type=float, default=18.0,
                    help="stop training early past this wall-clock time")
    ap.add_argument("--check-only", action="store_true",
                    help="only reload the saved model and generate")
    ap.add_argument("--draft", action="store_true",
                    help="train the draft model instead (DRAFT_SHAPE, the default model's "
                         "tokenizer; --out defaults to refimpl/data/default-draft)")
    args = ap.parse_args(argv)
    if args.draft:
        global MODEL_SHAPE
        MODEL_SHAPE = DRAFT_SHAPE
        if args.out == DEFAULT_OUT:
            args.out = DRAFT_OUT

    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(args.threads)
    if args.check_only:
        check(args.out)
        return 0

    t0 = time.time()
    docs, chats = build_corpus(args.seed)
    print(f"corpus: {len(docs)} documents ({sum(map(len, docs)):,} characters), "
          f"{len(chats)} conversations  [{time.time() - t0:.1f} s]", flush=True)
    os.makedirs(args.out, exist_ok=True)
    if args.draft:           # the target's tokenizer, byte for byte
        for f in ("tokenizer.model",):
            shutil.copyfile(os.path.join(DEFAULT_OUT, f), os.path.join(args.out, f))
        tok = Tokenizer.from_dir(args.out)
    else:
        tok = train_tokenizer(docs, chats, args.out, args.vocab_size)
    data = token_stream(tok, docs, chats, args.chat_repeats, args.seed)
    print(f"tokenizer: {tok.vocab_size} pieces, eos {tok.eos_id} ([unused10]); "
          f"token stream {len(data):,} tokens  [{time.time() - t0:.1f} s]", flush=True)

    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(llama_config(tok.vocab_size, tok.eos_id))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters (tied embeddings)", flush=True)
    stats = train(model, data, args.steps, args.batch, args.seq_len, args.lr, args.seed,
                  autocast=not args.no_autocast, max_minutes=args.max_minutes)
    print(f"trained {stats['steps']} steps, {stats['tokens']:,} tokens "
          f"({stats['tokens'] / len(data):.1f} epochs) in {stats['seconds'] / 60:.1f} min; "
          f"final loss {stats['final_loss']:.3f}, mean of the last 50 steps "
          f"{stats['final_loss_mean_last_50']:.3f}", flush=True)
    save_model(model, tok, args.out)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"saved {args.out}: {sorted(os.listdir(args.out))}, {size / 2**20:.2f} MiB")
    check(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
