"""The console chat: reads lines, runs commands, streams answers. Used by demo_chatbot.py and train_chatbot.py."""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
from typing import Callable, List, Optional, TextIO

from .chat import ChatSession
from .errors import ChatkitError, Terminated
from .files import cache_dir

HISTORY_FILE = "chat-history"  # in the cache folder: lines typed in earlier chats, for the arrow keys
HISTORY_LINES = 1000

HELP = """Commands:
  quit, exit      end the chat (Ctrl-D or Ctrl-C work too)
  clear           forget the conversation so far
  history         show the conversation so far
  /save FILE      save the conversation as training data (JSON, messages format); /save! FILE replaces a file
  /system TEXT    set the system prompt (empty TEXT removes it); clears the conversation
  /help           this list
To paste several lines as one message, type \"\"\" on a line of its own, paste, then \"\"\" again."""

MULTILINE = '"""'


class LineReader:
    """The console's input: lines (a \"\"\"-delimited block as one message), with arrow keys, editing and
    history kept between chats on a terminal (readline). `read` is injectable for tests; `say` prints a note."""

    def __init__(self, read: Optional[Callable[[str], str]], say: Callable[[str], None]):
        self.read = read or (lambda prompt: input(prompt))  # looked up late, so input() can be scripted
        self.read_from_stdin = read is None
        self.say = say
        self.history_path: Optional[str] = None

    def start(self) -> None:
        """Bytes that are not UTF-8 read as U+FFFD; line editing and its history on a terminal, through readline."""
        if self.read_from_stdin and hasattr(sys.stdin, "reconfigure"):
            sys.stdin.reconfigure(errors="replace")
        try:
            terminal = self.read_from_stdin and sys.stdin is not None and sys.stdin.isatty()
        except (OSError, ValueError):  # a closed stdin
            terminal = False
        if not terminal:
            return
        try:
            import readline
        except ImportError:  # Windows without pyreadline: plain input
            return
        self.history_path = str(cache_dir() / HISTORY_FILE)
        try:
            readline.read_history_file(self.history_path)
        except OSError:
            pass
        readline.set_history_length(HISTORY_LINES)

    def save_history(self) -> None:
        if self.history_path is None:
            return
        import readline

        try:
            os.makedirs(os.path.dirname(self.history_path), exist_ok=True)
            readline.write_history_file(self.history_path)
        except OSError:
            pass

    def read_line(self, prompt: str) -> Optional[str]:
        """One line of input; None at its end (Ctrl-D, or no input at all: a closed stdin)."""
        try:
            return self.read(prompt)
        except EOFError:
            return None
        except UnicodeDecodeError:
            self.say("(That line was not valid UTF-8 text and was skipped; type it again.)")
            return ""
        except (RuntimeError, OSError, ValueError):  # input() with stdin closed or gone
            return None

    def read_message(self) -> Optional[str]:
        """One message: a line, or a \"\"\"-delimited block. None at end of input."""
        line = self.read_line("You: ")
        if line is None or line.strip() != MULTILINE:
            return line
        lines = []
        while True:
            line = self.read_line("... ")
            if line is None or line.strip() == MULTILINE:
                break
            lines.append(line)
        return "\n".join(lines)


class Console:
    """A read-eval-print loop over a ChatSession: commands, streamed answers, --compare columns. Input and
    output streams are injectable for tests."""

    def __init__(self, session: ChatSession, read: Optional[Callable[[str], str]] = None,
                 out: Optional[TextIO] = None, base: Optional[ChatSession] = None):
        self.session = session
        self.base = base  # --compare: the base model's session, answering the same messages
        self.out = out or sys.stdout
        self.input = LineReader(read, self.print)
        session.on_notice = lambda text: self.print(text)

    def print(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def banner(self) -> None:
        self.print(f"Chatting with {self.session.describe()}")
        if self.session.system_prompt:
            self.print(f"System prompt: {self.session.system_prompt}")
        self.print("Type a message and press Enter. Commands: quit, exit, clear, history, /save FILE, "
                   "/system TEXT, /help")

    def run(self) -> int:
        self.input.start()
        self.banner()
        try:
            while True:
                text = self.input.read_message()
                if text is None:
                    self.print()
                    break
                if not text.strip():
                    continue
                if not self.command(text.strip()):
                    break
        except KeyboardInterrupt as exc:
            self.print()
            if isinstance(exc, Terminated):
                self.input.save_history()
                raise
        self.input.save_history()
        self.print("Bye.")
        return 0

    def command(self, text: str) -> bool:
        """Handle one input; returns False when the chat should end."""
        lowered = text.lower()
        if lowered in ("quit", "exit", "/quit", "/exit"):
            return False
        if lowered in ("clear", "/clear"):
            self.session.reset()
            self.print("(Conversation cleared.)")
        elif lowered in ("history", "/history"):
            self.show_history()
        elif lowered in ("/help", "help"):
            self.print(HELP)
        elif lowered in ("/save", "/save!") or lowered.startswith(("/save ", "/save! ")):
            replace = lowered.startswith("/save!")
            path = os.path.expanduser(text[6 if replace else 5:].strip())
            if not path:
                self.print("Usage: /save FILE (/save! FILE replaces a file that exists)")
            else:
                try:
                    count = self.session.save(path, overwrite=replace)
                    self.print(f"(Saved {count} messages to {path}.)")
                except (ChatkitError, OSError) as exc:
                    self.print(f"error: {exc}")
        elif lowered == "/system" or lowered.startswith("/system "):
            for session in self.sessions:
                session.set_system_prompt(text[7:].strip())
                session.reset()
            self.print(f"(System prompt {'set' if self.session.system_prompt else 'removed'}; conversation cleared.)")
        elif text.startswith("/"):
            self.print(f"Unknown command {text.split()[0]}; /help lists them.")
        elif self.base is not None:
            self.compare(text)
        else:
            self.answer(text)
        return True

    @property
    def sessions(self) -> List[ChatSession]:
        return [self.session] + ([self.base] if self.base is not None else [])

    def compare(self, text: str) -> None:
        """--compare: both answers, the base model's and the trained one's, side by side."""
        answers = []
        for session, label in ((self.base, "base model"), (self.session, "trained")):
            self.out.write(f"({label} answering...)\r")
            self.out.flush()
            try:
                answers.append(session.reply(text))
            except KeyboardInterrupt as exc:
                if isinstance(exc, Terminated):
                    raise
                self.print("\n(Stopped.)")
                return
            except ChatkitError as exc:
                self.print(f"\nerror: {exc}")
                return
        self.print(side_by_side(("Base model", "Trained"), answers, shutil.get_terminal_size((100, 24)).columns))

    def answer(self, text: str) -> None:
        """Stream the answer; Ctrl-C stops it (what was said so far is kept) and returns to the prompt."""
        self.out.write("Bot: ")
        pieces = self.session.stream(text)
        try:
            for piece in pieces:
                self.out.write(piece)
                self.out.flush()
        except KeyboardInterrupt as exc:
            pieces.close()
            if isinstance(exc, Terminated):
                raise
            self.print("\n(Stopped. Ctrl-C at the prompt, or quit, ends the chat.)")
            return
        except ChatkitError as exc:
            self.print(f"\nerror: {exc}")
            return
        self.print()

    def show_history(self) -> None:
        messages = self.session.messages()
        for message in messages:
            self.print(f"[{message['role']}] {message['content']}")
        if not any(m["role"] != "system" for m in messages):
            self.print("(No conversation yet.)")


def side_by_side(titles, texts, width: int) -> str:
    """Two texts in two columns under their titles; one after the other on a narrow terminal."""
    if width < 60:
        return "\n".join(f"[{title}]\n{text}" for title, text in zip(titles, texts))
    column = (width - 3) // 2
    lines = [[title] + [line for part in text.splitlines() or [""] for line in textwrap.wrap(part, column) or [""]]
             for title, text in zip(titles, texts)]
    rows = max(len(side) for side in lines)
    out = []
    for index in range(rows):
        left, right = (side[index] if index < len(side) else "" for side in lines)
        out.append(f"{left:<{column}} | {right}".rstrip())
        if index == 0:
            out.append("-" * column + "-+-" + "-" * column)
    return "\n".join(out)
