"""The terminal side of `edgeinfer chat`: prompt_toolkit for input, plain streaming for answers."""

# Input: arrow-key history kept across sessions, Esc-Enter (or Alt-Enter) for a new
# line, pasted blocks arrive whole (bracketed paste), and a block between two lines
# of three quotes (""") is one message. Ctrl-C clears the line, or exits at an
# empty prompt; Ctrl-D exits. Ctrl-C while the model answers stops the answer only.
# Once there is a conversation to lose, Ctrl-C at an empty prompt first says how to
# leave and the next press leaves: a second press meant to stop an answer lands at
# the prompt when the answer stops quickly, and must not end the chat.
# Keys typed while the model answers are not echoed into it; they wait for the next
# prompt, as typeahead does in a shell (Enter among them sends the line).

from __future__ import annotations

import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from rich.cells import cell_len
from rich.console import Console
from rich.text import Text

from edgeinfer.chat import ChatSession, Conversation, is_text
from edgeinfer.config import expand_user
from edgeinfer.errors import EdgeinferError, UsageError
from edgeinfer.render import print_error, print_note, visible

HELP = """\
/help           this help
/system TEXT    set the system message (empty: remove it)
/reset          forget the conversation (the system message stays)
/save FILE      save the conversation as JSON
/load FILE      continue a saved conversation
/stats          figures of the last answer
/set NAME VALUE change a setting for the answers to come: temperature, top-k, top-p,
                min-p, repeat-penalty, repeat-last-n, seed, max-tokens (none: no cap)
/show           the settings the next answer uses
/format json    answer with a JSON object (/format off: free text again)
/schema FILE    answer with JSON that matches a JSON Schema (a file, or the schema inline)
/exit, /bye     leave (Ctrl-D too)
Esc-Enter inserts a new line; a block between two lines of \"\"\" is one message."""

PROMPT = ">>> "


def loop(session: ChatSession, console: Console, history_file: Path, stats_line: Callable[[object], str]) -> int:
    """Read and answer until the input ends; returns the exit code.

    A message or command that fails is one error line, and the conversation goes on. On a
    terminal that is all; through a pipe the exit code is then that of the first failure
    (0 when none), so a script can tell.
    """
    interactive = sys.stdin.isatty()
    read = _terminal_reader(history_file, console) if interactive else _plain_reader()
    console.print(Text(f"chatting with {visible(session.conversation.model)}; /help for commands, Ctrl-D to leave",
                       style="dim"))
    try:
        with _ended_by_signals(), _keys_wait_for_the_prompt(interactive):
            failure = _converse(read, session, console, stats_line)
    except _Ended as ended:
        return 128 + ended.signum  # (what a shell reports for a process the signal ended)
    return 0 if interactive else failure


def _converse(read: Callable[[bool], str | None], session: ChatSession, console: Console,
              stats_line: Callable[[object], str]) -> int:
    """The conversation until the input ends; returns the exit code of the first failure (0 when none)."""
    failure = 0
    told: set[str] = set()  # notes already given in this conversation
    warned = False  # the last Ctrl-C at the empty prompt said how to leave
    while True:
        try:
            text = read(bool(session.conversation.turns) and not warned)
            warned = text is None
            if text is None or not text.strip():
                continue
            _check_text(text)
            if text.strip().startswith("/"):
                if _command(text.strip(), session, console, stats_line) == "exit":
                    break
            else:
                _answer(session, text, console, told)
        except EOFError:
            break
        except EdgeinferError as exc:
            print_error(console, str(exc))
            failure = failure or exc.exit_code
    return failure


class _Ended(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def _ended_by_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP end the chat as Ctrl-D does, by unwinding: left to Python's default the
    process would die in the prompt's raw mode, and a shell that does not repair the terminal (dash)
    would be left without echo and line editing."""
    def end(signum: int, frame: object) -> None:
        raise _Ended(signum)

    previous = {number: signal.signal(number, end) for number in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _check_text(text: str) -> None:
    """Refuse a line that is not UTF-8 (prompt_toolkit passes such bytes on as lone surrogates)."""
    if not is_text(text):
        raise UsageError("the line is not UTF-8 text; it was not sent")


@contextmanager
def _keys_wait_for_the_prompt(interactive: bool) -> Iterator[None]:
    """Outside the prompt (while the model answers) the terminal neither echoes keys nor collects them
    into lines, and Ctrl-C does not flush them: what is typed waits, byte for byte, for prompt_toolkit to
    read at the next prompt. Ctrl-C still signals; outside an answer (the moment between its end and the
    prompt) it is ignored, where Python would raise KeyboardInterrupt and end the chat."""
    if not interactive:
        yield
        return
    import termios

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    quiet = list(saved)
    quiet[3] = saved[3] & ~(termios.ECHO | termios.ICANON | termios.IEXTEN) | termios.NOFLSH
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # (generate sets its own while it runs)
    termios.tcsetattr(fd, termios.TCSANOW, quiet)  # (TCSANOW: TCSAFLUSH would drop what was typed)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)
        signal.signal(signal.SIGINT, previous)


def _answer(session: ChatSession, text: str, console: Console, told: set[str]) -> None:
    def write(piece: str) -> None:
        out.push(piece)
        sys.stdout.flush()

    out = _WordWrap(shutil.get_terminal_size().columns, sys.stdout.write) if sys.stdout.isatty() else _Plain()
    reply = session.ask(text, on_text=write)
    out.flush()
    sys.stdout.write("\n")
    if reply.result.finish_reason == "interrupted":
        console.print(Text("[answer stopped]", style="dim"))
    # Why --draft ran at plain speed past 256 tokens of context, and what helps: once a conversation.
    cut = reply.result.stats.get("long_context")
    if cut and cut not in told:
        told.add(cut)
        print_note(console, cut)
    if reply.result.schema_valid is False:
        print_note(console, reply.result.schema_error)
    if reply.dropped_turns:
        print_note(console, f"the conversation outgrew the context: the {reply.dropped_turns} oldest messages were dropped")


class _WordWrap:
    """Streamed text broken at spaces where a word would cross the terminal's right edge, where the
    terminal itself would break it in the middle. A word is held until it ends (a space, a newline,
    the answer's end), then written on this line or the next; one longer than a line is broken."""

    def __init__(self, width: int, write: Callable[[str], object]) -> None:
        self.width, self.write = max(width, 2), write
        self.column = 0  # cells taken on the current line
        self.word = ""

    def push(self, text: str) -> None:
        for char in text:
            if char in " \t\n":
                self.flush()
                self._space(char)
            else:
                self.word += char
                if cell_len(self.word) >= self.width:
                    self.flush()

    def flush(self) -> None:
        """Write the word held back."""
        cells = cell_len(self.word)
        if self.column and self.column + cells > self.width:
            self._newline()
        self.write(self.word)
        self.column += cells
        self.word = ""

    def _space(self, char: str) -> None:
        cells = 8 - self.column % 8 if char == "\t" else 1
        if char == "\n" or self.column + cells > self.width:  # (a space at the edge becomes the line's end)
            self._newline()
        else:
            self.write(char)
            self.column += cells

    def _newline(self) -> None:
        self.write("\n")
        self.column = 0


class _Plain:
    """Text as it comes, for a stdout that is not a terminal: no line breaks of ours in what is kept."""

    def push(self, text: str) -> None:
        sys.stdout.write(text)

    def flush(self) -> None:
        pass


def _command(line: str, session: ChatSession, console: Console, stats_line: Callable[[object], str]) -> str | None:
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/bye", "/quit"):
        return "exit"
    if name == "/help":
        console.print(Text(HELP))
    elif name == "/system":
        session.set_system(arg)
        console.print("system message " + ("set" if arg else "removed"))
    elif name == "/reset":
        session.reset()
        console.print("conversation cleared")
    elif name in ("/save", "/load") and not arg:
        raise UsageError(f"{name} needs a file: {name} FILE")
    elif name == "/save":
        session.conversation.save(expand_user(arg))
        console.print(Text(f"saved to {visible(arg)}"))
    elif name == "/load":
        _load(session, arg, console)
    elif name == "/stats":
        console.print(Text(stats_line(session.last) if session.last else "no answer yet"))
    elif name == "/set":
        _set(session, arg, console)
    elif name in ("/format", "/schema"):
        _constrain(session, name, arg, console)
    elif name == "/show":
        shown = (f"{key:<15} {_shown_setting(key, value)}" for key, value in session.settings().items())
        console.print(Text("\n".join(shown)))
    else:
        raise UsageError(f"unknown command {name}; /help lists them")
    return None


def _set(session: ChatSession, arg: str, console: Console) -> None:
    """`/set NAME VALUE`, or ollama's `/set parameter NAME VALUE`."""
    words = arg.split()
    if words[:1] == ["parameter"]:
        words = words[1:]
    if len(words) != 2:
        raise UsageError("/set takes a setting and a value: /set temperature 0.3 (/show lists the settings)")
    key = session.set(*words)
    console.print(Text(f"{key} {_shown_setting(key, session.settings()[key])}"))


def _constrain(session: ChatSession, name: str, arg: str, console: Console) -> None:
    """`/format json|off` or `/schema FILE`: what the answers to come must be."""
    from edgeinfer.grammar import from_format, schema_argument

    if not arg:
        raise UsageError("/format takes json or off" if name == "/format" else
                         "/schema needs a file (or the schema inline): /schema FILE; /format off removes it")
    session.constrain(from_format(arg, name) if name == "/format" else schema_argument(arg, name))
    console.print(Text(f"format {session.settings()['format']}"))


def _shown_setting(key: str, value: object) -> str:
    if value is None:
        return "random" if key == "seed" else "none (the context's room)"
    return str(value)


def _load(session: ChatSession, arg: str, console: Console) -> None:
    """Continue a saved conversation with this session's model, saying so if it was held with another."""
    current, saved = session.conversation.model, Conversation.load(expand_user(arg))
    other = bool(saved.model) and saved.model != current
    session.replace(replace(saved, model=current) if other else saved)
    console.print(Text(f"loaded {len(saved.turns)} messages from {visible(arg)}"))
    if other:
        print_note(console, f"saved with {visible(saved.model)}; continuing with {visible(current)}")


def _terminal_reader(history_file: Path, console: Console) -> Callable[[bool], str | None]:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory
    from prompt_toolkit.key_binding import KeyBindings

    bindings = KeyBindings()
    spare = [False]  # the next Ctrl-C at an empty prompt only says how to leave

    @bindings.add("c-c")
    def _(event):
        buffer = event.app.current_buffer
        if buffer.text:
            buffer.reset()
        elif spare[0]:
            event.app.exit(result=None)
        else:
            event.app.exit(exception=EOFError)

    @bindings.add("escape", "enter")
    def _(event):
        event.app.current_buffer.insert_text("\n")

    history_file.parent.mkdir(parents=True, exist_ok=True)
    prompt = PromptSession(history=FileHistory(str(history_file)), key_bindings=bindings)

    def read(warn: bool) -> str | None:
        """A message; with `warn`, a Ctrl-C at the empty prompt only says how to leave, and nothing is
        read (None)."""
        spare[0] = warn
        text = prompt.prompt(PROMPT)
        if text is None:
            console.print(Text("Ctrl-C again, Ctrl-D or /exit leaves; /save FILE keeps the conversation", style="dim"))
            return None
        if text.strip() == '"""':
            spare[0] = False
            lines = []
            while (line := prompt.prompt("... ")).strip() != '"""':
                lines.append(line)
            return "\n".join(lines)
        return text

    return read


def _plain_reader() -> Callable[[bool], str | None]:
    """Piped input: one message per line, so a script can hold a conversation.

    Read as bytes and decoded strictly: a line that is not UTF-8 is refused alone (where
    Python's own decoding of stdin would pass its bytes on as surrogates, for the tokenizer
    to fail on), and the next line is read as usual.
    """
    number = 0

    def read(_warn: bool) -> str | None:
        nonlocal number
        line = sys.stdin.buffer.readline()
        if not line:
            raise EOFError
        number += 1
        try:
            return line.decode("utf-8").rstrip("\n")
        except UnicodeDecodeError as exc:
            raise UsageError(f"input line {number} is not UTF-8 text (byte 0x{line[exc.start]:02x} at offset "
                             f"{exc.start}); it was skipped") from None

    return read
