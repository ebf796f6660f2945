"""Chat on the terminal with a trained model: multi-turn, `clear` resets, `quit` leaves.

    python chat.py --path output/step1_sft
    python chat.py --path smollm2-135m --do_sample --temperature 0.8
"""
from __future__ import annotations

import argparse
import sys

from utils.config import DTYPES


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", required=True, help="model folder (a step's output) or built-in name")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top_p", type=float, default=0.9)
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--repetition_penalty", type=float, default=1.0)
    parser.add_argument("--prompt_format", default="auto", choices=("auto", "template", "human_assistant"),
                        help="auto: Human/Assistant turns for models trained here (the format the "
                        "pipeline trains on), else the tokenizer's chat template if it has one")
    parser.add_argument("--dtype", default="auto", choices=DTYPES)
    parser.add_argument("--trust_remote_code", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from transformers import TextStreamer

    from inference.chat import ChatSession, GenerationSettings, default_prompt_format, load_for_generation

    model, tokenizer = load_for_generation(args.path, args.dtype, args.trust_remote_code)
    settings = GenerationSettings(args.max_new_tokens, args.do_sample, args.temperature, args.top_p,
                                  args.top_k, args.repetition_penalty)
    session = ChatSession(model, tokenizer, settings,
                          prompt_format=default_prompt_format(args.path, args.prompt_format))
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    print(f"Chatting with {args.path}. Type `clear` to start over, `quit` to leave.", flush=True)
    while True:
        try:
            message = input("Human: ").strip()
        except EOFError:
            print()
            break
        if message == "quit":
            break
        if message == "clear":
            session.clear()
            print("(history cleared)", flush=True)
            continue
        if not message:
            continue
        print("Assistant: ", end="", flush=True)
        session.reply(message, streamer=streamer)
        sys.stdout.flush()


if __name__ == "__main__":
    from utils.cli import run_entry
    run_entry(main)
