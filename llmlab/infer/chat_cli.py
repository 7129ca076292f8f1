"""``llmlab chat``: an interactive terminal chat with a model directory, a Hugging Face folder or a GGUF file.

Each turn renders the whole conversation with the model's chat template (``add_generation_prompt=True``) and
streams the answer. When the rendered prompt plus ``--max-new-tokens`` would not fit the context, the oldest
exchanges are dropped (with a notice). Commands: ``/reset``, ``/system TEXT``, ``/save FILE``, ``/quit``, ``/help``.
Ctrl-C stops the current answer and keeps the session; Ctrl-C twice at the prompt (or Ctrl-D) exits.
With ``--defense NAME[,NAME...]`` (see ``llmlab.redteam.defenses``) each answer comes whole from the defended model,
with a note when a filter blocked it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, TextIO

from .. import chat
from ..errors import LLMLabError
from ..hub.folder import ModelDir
from ..redteam.defended import Answerer, DefendedChat
from ..redteam.defenses import add_defense_args, defended_chat
from .engine import Engine, SamplingParams, add_sampling_args, engine_from_args, sampling_from_args

HELP = ("commands: /reset (forget the conversation), /system TEXT (set the system prompt), "
        "/save FILE (write the messages as JSON), /quit; Ctrl-C stops an answer")


class ChatSession:
    """A conversation with one engine: history, system prompt, context fitting and streamed answers."""

    def __init__(self, engine: Engine, template: str, params: SamplingParams, *, system: str | None = None,
                 out: TextIO | None = None, label: str = "assistant> ", defended: DefendedChat | None = None):
        if params.max_new_tokens >= engine.context:
            raise LLMLabError(f"--max-new-tokens {params.max_new_tokens} leaves no room for a prompt in this "
                              f"model's context of {engine.context} tokens")
        self.engine, self.template, self.out, self.label = engine, template, out or sys.stdout, label
        self.params = chat.reply_params(params, template, engine.tokenizer.eos_token)
        self.system = system
        self.history: list[dict] = []            # user/assistant messages, alternating
        self.defended = defended

    def messages(self, history: list[dict] | None = None) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + (self.history if history is None else history)

    def encode(self, history: list[dict]) -> list[int]:
        return chat.generation_prompt_ids(self.engine.tokenizer, self.messages(history), self.template)

    def fit(self, user_text: str) -> list[int]:
        """Token ids of the conversation plus ``user_text``, dropping the oldest exchanges until the prompt plus
        max_new_tokens fits the context."""
        history = self.history + [{"role": "user", "content": user_text}]
        dropped = 0
        while True:
            ids = self.encode(history)
            if len(ids) + self.params.max_new_tokens <= self.engine.context:
                break
            if len(history) == 1:
                raise LLMLabError(f"this message makes a prompt of {len(ids)} tokens; with --max-new-tokens "
                                  f"{self.params.max_new_tokens} it does not fit the context of "
                                  f"{self.engine.context} tokens: shorten it (or the system prompt)")
            history, dropped = history[2:], dropped + 1
        if dropped:
            self.out.write(f"(context full: dropped the oldest {dropped} exchange{'s' * (dropped > 1)})\n")
        self.history = history[:-1]
        return ids

    def reply(self, user_text: str) -> str:
        """Stream the answer to ``user_text``; Ctrl-C stops it early (the partial answer is kept)."""
        ids = self.fit(user_text)
        if self.defended is not None:
            return self.defended_reply(user_text)
        pieces = []
        self.out.write(self.label)
        try:
            for piece in self.engine.stream(ids, self.params):
                pieces.append(piece)
                self.out.write(piece)
                self.out.flush()
        except KeyboardInterrupt:
            self.out.write(" [stopped]")
        self.out.write("\n")
        answer = "".join(pieces)
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer}]
        return answer

    def defended_reply(self, user_text: str) -> str:
        """The defended model's whole answer to ``user_text`` (after ``fit``), and why a filter blocked it."""
        reply = self.defended.answer([self.messages(self.history + [{"role": "user", "content": user_text}])])[0]
        note = f" [blocked by {reply.blocked_by}]" if reply.blocked_by else ""
        self.out.write(f"{self.label}{reply.text}{note}\n")
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": reply.text}]
        return reply.text

    def handle(self, line: str) -> bool:
        """One line of input: a command or a message. False means quit."""
        line = line.strip()
        if not line:
            return True
        command, _, rest = line.partition(" ")
        if command == "/quit":
            return False
        if command == "/reset":
            self.history = []
            self.out.write("(conversation cleared)\n")
        elif command == "/system":
            self.system = rest.strip() or None
            self.out.write(f"(system prompt {'set' if self.system else 'removed'})\n")
        elif command == "/save":
            self.save(rest.strip())
        elif command.startswith("/") and command != "/":
            self.out.write(HELP + "\n")
        else:
            try:
                self.reply(line)
            except LLMLabError as e:
                self.out.write(f"error: {e}\n")
        return True

    def save(self, path: str) -> None:
        if not path:
            self.out.write("usage: /save FILE\n")
            return
        try:
            Path(path).write_text(json.dumps(self.messages(), ensure_ascii=False, indent=2) + "\n",
                                  encoding="utf-8")
        except OSError as e:
            self.out.write(f"error: cannot write {path}: {e.strerror}\n")
            return
        self.out.write(f"(saved {len(self.messages())} messages to {path})\n")


def repl(session: ChatSession, input_fn: Callable[[str], str] = input) -> None:
    """Read lines until /quit, end of input, or two Ctrl-C in a row at the prompt."""
    interrupted = False
    while True:
        try:
            line = input_fn("you> ")
        except EOFError:
            session.out.write("\n")
            return
        except KeyboardInterrupt:
            if interrupted:
                session.out.write("\n")
                return
            interrupted = True
            session.out.write("\n(press Ctrl-C again or type /quit to exit)\n")
            continue
        interrupted = False
        if not session.handle(line):
            return


def _chat_command(args) -> None:
    model = ModelDir(args.model)
    engine = engine_from_args(model, args)
    template = model.template(args.template)
    params = sampling_from_args(args)
    defended = None
    if args.defense:
        defended = defended_chat(Answerer(engine, template, params, batch_size=1), args.defense, args.defense_sets,
                                 world=args.world, device=args.device)
    if args.prompt is not None:
        ChatSession(engine, template, params, system=args.system, label="", defended=defended).reply(args.prompt)
        return
    session = ChatSession(engine, template, params, system=args.system, defended=defended)
    session.out.write(f"chatting with {args.model} (context {engine.context} tokens). {HELP}\n")
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    repl(session)


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat in the terminal with a model directory, Hugging Face folder or GGUF file")
    p.add_argument("--model", required=True, help="model directory, Hugging Face folder or name, or .gguf file")
    p.add_argument("--template", default=None, help="chat template: a built-in name or a .jinja file "
                                                    "(default: the model's own)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--prompt", default=None, help="answer this one message and exit")
    add_sampling_args(p)
    add_defense_args(p)
    p.add_argument("--world", default=None, metavar="DIR", help="task world folder: the secret the 'secret' defense "
                                                                "guards, the 'icd' demonstrations")
    p.set_defaults(func=_chat_command)
