"""Coloured shapes: a synthetic text-to-image world to train a tiny model on from scratch, and its exact evaluator
(docs/shapes.md). One concept a file, in reading order:

    world.py       the grammar of captions, the renderer, describe() (the exact judge) and score(): all that a reward
                   or a run needs to know of the world, on torch alone
    counter.py     the count rewards rewards.py serves: the learned counter (shapes-count) and describe()'s exact count
                   (shapes-count-exact); it imports world.py only
    tokenizer.py   the grammar's tokenizers (CLIP's BPE, a T5-style Unigram model), one token per word
    evaluate.py    sampling a shapes model and reading its samples with describe()
    train_unet.py  the model in models/shapes (a Stable Diffusion in miniature) and its counter, trained from scratch
    train_flow.py  its rectified-flow sibling in models/shapes-flow (an SD3 in miniature), on the same VAE and renders
    __main__.py    the command line: python -m shapes --show | --eval ... | --train [--flow] [--counter-only]

Import the file you need (`from shapes.world import describe`): this one imports nothing, so that a reward or a run
loads the world alone.
"""
