"""The grammar's tokenizers: each word of a caption is one token, so the models' text encoders read words, not letters.

    tokenizer = build_tokenizer("out/shapes/tokenizer")       # CLIP's BPE: the UNet model's, the flow model's CLIPs'
    t5_tokenizer = build_t5_tokenizer("out/shapes/t5")        # a T5-style Unigram model: the flow model's T5

Each saves itself in its directory (CLIPTokenizer / T5TokenizerFast.from_pretrained read it back) and pads captions to
MAX_TOKENS; text outside the grammar falls back to single characters.

Reference: byte-pair encoding, Sennrich et al. 2016 (arXiv:1508.07909), as CLIP's tokenizer uses it (Radford et al.
2021).
"""
import collections
import json
import os

from shapes.world import all_captions

MAX_TOKENS = 8  # token ids per caption, padded: start + count + colour + shape + end, and room to spare
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"  # as model.py's tiny tokenizer
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def build_tokenizer(directory):
    """A CLIPTokenizer for the grammar, saved in `directory`: each word of it ("a", "two", "red", "circle",
    "circles", ...) is one token, so the text encoder sees words, not letters. Other text falls back to single
    characters. Pads with the end token to MAX_TOKENS, as CLIP does; "" encodes to start, end, padding."""
    from transformers import CLIPTokenizer
    words = sorted({w for c in all_captions() for w in c.split()})
    merges = _learn_merges(words)
    symbols = list(CHARS) + [c + "</w>" for c in CHARS] + [a + b for a, b in merges] + [BOS, EOS]
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump({s: i for i, s in enumerate(symbols)}, f)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer.from_pretrained(directory, model_max_length=MAX_TOKENS, bos_token=BOS, eos_token=EOS,
                                              pad_token=EOS, unk_token=EOS)
    tokenizer.save_pretrained(directory)  # so that CLIPTokenizer.from_pretrained(directory) gives this one back
    split = [w for w in words if len(tokenizer(w, add_special_tokens=False).input_ids) != 1]
    if split:
        raise RuntimeError(f"the merges do not build these words into one token each: {split}")
    return tokenizer


def _learn_merges(words):
    """Byte-pair encoding's training (Sennrich et al. 2016) on the words, each once, until every word is one symbol:
    repeatedly merge the most frequent adjacent pair (ties: the first in sorted order). A BPE tokenizer applies merges
    lowest rank first, which replays this training, so it rebuilds each word whole. Merges written by hand, one chain
    per word, can break one another: "r e" (from "red") ranked before "t h" would split "three" as "th", "re", "e</w>"."""
    corpus = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in words]  # CLIP marks a word's last symbol with </w>
    merges = []
    while any(len(w) > 1 for w in corpus):
        pairs = collections.Counter(p for w in corpus for p in zip(w, w[1:]))
        pair = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(pair)
        corpus = [_merge(w, pair) for w in corpus]
    return merges


def _merge(word, pair):
    out, i = [], 0
    while i < len(word):
        if word[i:i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def build_t5_tokenizer(directory):
    """A T5-style tokenizer for the grammar, saved in `directory` (T5TokenizerFast.from_pretrained reads it back):
    a Unigram model in which each word of the grammar is one piece ("▁three", "▁red", "▁circles"), single characters
    the fallback, T5's ids (<pad> 0, </s> 1, <unk> 2) and </s> after every caption; MAX_TOKENS long, padded."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    words = sorted({w for c in all_captions() for w in c.split()})
    pieces = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)] + [("\u2581" + w, 0.0) for w in words]
              + [(c, -5.0) for c in CHARS])  # a word's piece scores above its letters: it is always taken whole
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()  # a space becomes "▁", the start of a word, as in T5
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                        model_max_length=MAX_TOKENS)
    tokenizer.save_pretrained(directory)
    return tokenizer
