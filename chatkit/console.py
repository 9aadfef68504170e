"""The console chat: reads lines, runs commands, streams answers. Used by demo_chatbot.py and train_chatbot.py."""

from __future__ import annotations

import sys
from typing import Callable, Optional, TextIO

from .chat import ChatSession
from .errors import ChatkitError

HELP = """Commands:
  quit, exit      end the chat (Ctrl-D or Ctrl-C work too)
  clear           forget the conversation so far
  history         show the conversation so far
  /save FILE      save the conversation as training data (JSON, messages format)
  /system TEXT    set the system prompt (empty TEXT removes it); clears the conversation
  /help           this list
To paste several lines as one message, type \"\"\" on a line of its own, paste, then \"\"\" again."""

MULTILINE = '"""'


class Console:
    """A read-eval-print loop over a ChatSession. Input and output streams are injectable for tests."""

    def __init__(self, session: ChatSession, read: Optional[Callable[[str], str]] = None,
                 out: Optional[TextIO] = None):
        self.session = session
        self.read = read or (lambda prompt: input(prompt))  # looked up late, so input() can be scripted
        self.read_from_stdin = read is None
        self.out = out or sys.stdout
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

    def read_line(self, prompt: str) -> Optional[str]:
        """One line of input; None at its end (Ctrl-D, or no input at all: a closed stdin)."""
        try:
            return self.read(prompt)
        except EOFError:
            return None
        except UnicodeDecodeError:
            self.print("(That line was not valid UTF-8 text and was skipped; type it again.)")
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

    def run(self) -> int:
        if self.read_from_stdin and hasattr(sys.stdin, "reconfigure"):
            sys.stdin.reconfigure(errors="replace")  # a byte that is not UTF-8 becomes U+FFFD, not an error
        self.banner()
        try:
            while True:
                text = self.read_message()
                if text is None:
                    self.print()
                    break
                if not text.strip():
                    continue
                if not self.command(text.strip()):
                    break
        except KeyboardInterrupt:
            self.print()
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
        elif lowered == "/save" or lowered.startswith("/save "):
            path = text[5:].strip()
            if not path:
                self.print("Usage: /save FILE")
            else:
                try:
                    count = self.session.save(path)
                    self.print(f"(Saved {count} messages to {path}.)")
                except (ChatkitError, OSError) as exc:
                    self.print(f"error: {exc}")
        elif lowered == "/system" or lowered.startswith("/system "):
            self.session.set_system_prompt(text[7:].strip())
            self.session.reset()
            self.print(f"(System prompt {'set' if self.session.system_prompt else 'removed'}; conversation cleared.)")
        elif text.startswith("/"):
            self.print(f"Unknown command {text.split()[0]}; /help lists them.")
        else:
            self.answer(text)
        return True

    def answer(self, text: str) -> None:
        """Stream the answer; Ctrl-C stops it (what was said so far is kept) and returns to the prompt."""
        self.out.write("Bot: ")
        pieces = self.session.stream(text)
        try:
            for piece in pieces:
                self.out.write(piece)
                self.out.flush()
        except KeyboardInterrupt:
            pieces.close()
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
