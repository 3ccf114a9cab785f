"""ZVT codecs (PA00P016 transport, PA00P015 commands): pure functions and frozen values.

Layers, bottom up: serial frames (``10 02 <APDU> 10 03 <CRC-lo> <CRC-hi>``, DLE stuffing,
CRC-16/KERMIT over APDU + ETX) with an incremental decoder that resynchronises on garbage;
APDUs (``CLASS INSTR LEN DATA``, ``LEN FF`` = two more length bytes, low byte first) with a
splitter for bare ZVT-over-TCP streams; BMPs (fixed, LLVAR, LLLVAR, the BMP 06 TLV container);
the messages the terminal sends, decoded into frozen dataclasses; builders for the ECR commands.

Parsing raises nothing but :class:`devices.errors.DeviceProtocolError`. A PAN never leaves this
module unmasked: an unmasked BMP 22 from a faulty terminal is masked to all but the last four.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

from devices.errors import DeviceProtocolError

DLE: Final = 0x10
STX: Final = 0x02
ETX: Final = 0x03
ACK: Final = 0x06
NAK: Final = 0x15
MAX_DATA_LEN: Final = 0xFFFF


def _crc_table() -> tuple[int, ...]:
    table = []
    for value in range(256):
        crc = value
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8408 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE: Final = _crc_table()


def crc16_kermit(data: bytes) -> int:
    """CRC-16/KERMIT (reflected 0x1021, init 0, no final xor); ``b"123456789"`` → 0x2189."""
    crc = 0
    for byte in data:
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ byte) & 0xFF]
    return crc


def encode_frame(apdu: bytes) -> bytes:
    """Wrap an APDU for the serial line: DLE STX, stuffed APDU, DLE ETX, CRC low byte first."""
    crc = crc16_kermit(apdu + bytes([ETX]))
    body = apdu.replace(b"\x10", b"\x10\x10")
    return b"\x10\x02" + body + b"\x10\x03" + bytes([crc & 0xFF, crc >> 8])


class Control(enum.Enum):
    """A bare transport acknowledgement byte between frames."""

    ACK = ACK
    NAK = NAK


@dataclass(frozen=True, slots=True)
class FrameOk:
    """A frame with a good CRC: answer ACK, then process ``apdu``."""

    apdu: bytes


@dataclass(frozen=True, slots=True)
class FrameBad:
    """A broken frame (bad CRC, DLE error, T1 gap, overflow): answer NAK."""

    reason: str


FrameEvent = FrameOk | FrameBad | Control

_MAX_FRAME_APDU: Final = 5 + MAX_DATA_LEN


class _Rx(enum.Enum):
    IDLE = enum.auto()
    IDLE_DLE = enum.auto()
    DATA = enum.auto()
    DATA_DLE = enum.auto()
    CRC_LO = enum.auto()
    CRC_HI = enum.auto()


class FrameDecoder:
    """Incremental serial-frame decoder; garbage between frames is counted in ``discarded``."""

    __slots__ = ("_buf", "_crc_lo", "_state", "discarded")

    def __init__(self) -> None:
        self._state = _Rx.IDLE
        self._buf = bytearray()
        self._crc_lo = 0
        self.discarded = 0

    @property
    def in_frame(self) -> bool:
        """True between a frame's DLE STX and its last CRC byte (the T1 gap applies)."""
        return self._state not in (_Rx.IDLE, _Rx.IDLE_DLE)

    def feed(self, data: bytes) -> list[FrameEvent]:
        """Consume bytes; returns the complete events they finish, in order."""
        events: list[FrameEvent] = []
        for byte in data:
            event = self._step(byte)
            if event is not None:
                events.append(event)
        return events

    def expire(self) -> FrameBad | None:
        """The T1 inter-byte gap passed: drop a partial frame (→ NAK) or a lone DLE."""
        if self._state is _Rx.IDLE_DLE:
            self.discarded += 1
            self._state = _Rx.IDLE
            return None
        if not self.in_frame:
            return None
        return self._broken("T1 gap inside a frame")

    def _broken(self, reason: str) -> FrameBad:
        self.discarded += 2 + len(self._buf)
        self._buf.clear()
        self._state = _Rx.IDLE
        return FrameBad(reason)

    def _step(self, byte: int) -> FrameEvent | None:
        state = self._state
        if state is _Rx.IDLE:
            if byte == DLE:
                self._state = _Rx.IDLE_DLE
            elif byte in (ACK, NAK):
                return Control(byte)
            else:
                self.discarded += 1
            return None
        if state is _Rx.IDLE_DLE:
            if byte == STX:
                self._buf.clear()
                self._state = _Rx.DATA
                return None
            self.discarded += 1
            self._state = _Rx.IDLE
            return self._step(byte)
        if state is _Rx.DATA:
            if byte == DLE:
                self._state = _Rx.DATA_DLE
                return None
            self._buf.append(byte)
            return self._broken("frame too long") if len(self._buf) > _MAX_FRAME_APDU else None
        if state is _Rx.DATA_DLE:
            return self._after_dle(byte)
        if state is _Rx.CRC_LO:
            self._crc_lo = byte
            self._state = _Rx.CRC_HI
            return None
        apdu = bytes(self._buf)
        self._buf.clear()
        self._state = _Rx.IDLE
        if crc16_kermit(apdu + bytes([ETX])) != self._crc_lo | byte << 8:
            self.discarded += 6 + len(apdu)
            return FrameBad("CRC mismatch")
        return FrameOk(apdu)

    def _after_dle(self, byte: int) -> FrameEvent | None:
        if byte == DLE:
            self._buf.append(DLE)
            self._state = _Rx.DATA
            return None
        if byte == ETX:
            self._state = _Rx.CRC_LO
            return None
        if byte == STX:  # a new frame starts inside this one: drop this one, keep the new one
            event = self._broken("frame restarted")
            self._state = _Rx.DATA
            return event
        event = self._broken(f"DLE followed by 0x{byte:02X}")
        self.discarded += 2
        return event


@dataclass(frozen=True, slots=True)
class Apdu:
    """One application message: control field (class, instruction) and its data block."""

    cls: int
    instr: int
    data: bytes = b""

    def encode(self) -> bytes:
        """The wire bytes; lengths of 255 and more use ``FF lo hi``."""
        size = len(self.data)
        if size > MAX_DATA_LEN:
            raise ValueError(f"APDU data of {size} bytes exceeds {MAX_DATA_LEN}")
        length = bytes([size]) if size < 0xFF else bytes([0xFF, size & 0xFF, size >> 8])
        return bytes([self.cls, self.instr]) + length + self.data

    def __str__(self) -> str:
        return f"{self.cls:02X} {self.instr:02X} ({len(self.data)} B)"


def _apdu_header(buf: bytes | bytearray) -> tuple[int, int] | None:
    """(header size, data length), or None when the header is still incomplete."""
    if len(buf) < 3:
        return None
    if buf[2] != 0xFF:
        return 3, buf[2]
    if len(buf) < 5:
        return None
    return 5, buf[3] | buf[4] << 8


def decode_apdu(raw: bytes) -> Apdu:
    """Parse exactly one APDU; the length field must match the data."""
    header = _apdu_header(raw)
    if header is None:
        raise DeviceProtocolError(f"APDU of {len(raw)} bytes is too short")
    size, length = header
    if len(raw) != size + length:
        raise DeviceProtocolError(f"APDU length field {length} but {len(raw) - size} data bytes")
    return Apdu(raw[0], raw[1], bytes(raw[size:]))


class ApduSplitter:
    """Splits a bare ZVT-over-TCP byte stream into APDUs by their length fields."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes of an incomplete APDU held back."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Apdu]:
        """Consume bytes; returns every APDU they complete."""
        self._buf += data
        out: list[Apdu] = []
        while (header := _apdu_header(self._buf)) is not None:
            size, length = header
            if len(self._buf) < size + length:
                break
            out.append(Apdu(self._buf[0], self._buf[1], bytes(self._buf[size : size + length])))
            del self._buf[: size + length]
        return out


# --- BMPs -----------------------------------------------------------------------------------

_LL: Final = -2
_LLL: Final = -3
_TLV: Final = -1

#: Length of every BMP id we know (PA00P015 ch. 3 and the command chapters): bytes, or a VAR kind.
BMP_LENGTHS: Final[dict[int, int]] = {
    0x01: 1, 0x02: 1, 0x03: 1, 0x04: 6, 0x05: 1, 0x06: _TLV, 0x0B: 3, 0x0C: 3, 0x0D: 2,
    0x0E: 2, 0x17: 2, 0x19: 1, 0x22: _LL, 0x23: _LL, 0x24: _LLL, 0x27: 1, 0x29: 4, 0x2A: 15,
    0x2D: _LL, 0x2E: _LLL, 0x37: 3, 0x3A: 2, 0x3B: 8, 0x3C: _LLL, 0x3D: 3, 0x49: 2, 0x4C: _LL,
    0x60: _LLL, 0x87: 2, 0x88: 3, 0x8A: 1, 0x8B: _LL, 0x8C: 1, 0x92: _LLL, 0x9A: _LLL,
    0xA0: 1, 0xA7: _LL, 0xAA: 3, 0xAF: _LLL, 0xBA: 5, 0xD0: 1, 0xD1: _LL, 0xD2: 1, 0xD3: 1,
    0xE0: 1, 0xE9: 1, 0xEA: 1, 0xEB: 8, 0xF0: 1, 0xF9: 1, 0xFA: 1, 0xFB: 1, 0xFC: 1,
    **{bmp: _LL for bmp in (*range(0xE1, 0xE9), *range(0xF1, 0xF9))},
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Bmp:
    """One bitmap field; ``value`` excludes its id and its LLVAR/LLLVAR/BER length."""

    id: int
    value: bytes


@dataclass(frozen=True, slots=True)
class Tlv:
    """One data object of the BMP 06 container; constructed tags carry parsed ``children``."""

    tag: int
    value: bytes
    children: tuple[Tlv, ...] = ()


class _Cursor:
    """Bounds-checked reading of a byte string; running off the end is a protocol error."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def done(self) -> bool:
        return self.pos >= len(self.data)

    def take(self, count: int, what: str) -> bytes:
        end = self.pos + count
        if end > len(self.data):
            raise DeviceProtocolError(
                f"{what}: need {count} bytes, {len(self.data) - self.pos} left"
            )
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def byte(self, what: str) -> int:
        return self.take(1, what)[0]

    def var_length(self, digits: int, what: str) -> int:
        length = 0
        for byte in self.take(digits, what):
            if byte >> 4 != 0xF or byte & 0xF > 9:
                raise DeviceProtocolError(f"{what}: bad LLVAR length byte 0x{byte:02X}")
            length = length * 10 + (byte & 0xF)
        return length

    def ber_length(self, what: str) -> int:
        first = self.byte(what)
        if first < 0x80:
            return first
        if first == 0x81:
            return self.byte(what)
        if first == 0x82:
            high, low = self.take(2, what)
            return high << 8 | low
        raise DeviceProtocolError(f"{what}: unsupported BER length 0x{first:02X}")


def parse_bmps(data: bytes) -> tuple[Bmp, ...]:
    """Split a data block into BMPs; an id of unknown length is a protocol error."""
    cursor = _Cursor(data)
    out: list[Bmp] = []
    while not cursor.done:
        bmp_id = cursor.byte("BMP id")
        kind = BMP_LENGTHS.get(bmp_id)
        what = f"BMP {bmp_id:02X}"
        if kind is None:
            raise DeviceProtocolError(f"{what}: unknown id, length unknown")
        if kind == _LL:
            length = cursor.var_length(2, what)
        elif kind == _LLL:
            length = cursor.var_length(3, what)
        elif kind == _TLV:
            length = cursor.ber_length(what)
        else:
            length = kind
        out.append(Bmp(bmp_id, cursor.take(length, what)))
    return tuple(out)


def parse_tlv(data: bytes, *, depth: int = 0) -> tuple[Tlv, ...]:
    """Parse BER-TLV objects (multi-byte tags, lengths ``<80``/``81 ll``/``82 hh ll``)."""
    if depth > 8:
        raise DeviceProtocolError("TLV nested too deeply")
    cursor = _Cursor(data)
    out: list[Tlv] = []
    while not cursor.done:
        first = cursor.byte("TLV tag")
        tag = first
        if first & 0x1F == 0x1F:
            while True:
                following = cursor.byte("TLV tag")
                tag = tag << 8 | following
                if not following & 0x80:
                    break
                if tag > 0xFFFFFF:
                    raise DeviceProtocolError("TLV tag longer than 3 bytes")
        value = cursor.take(cursor.ber_length("TLV length"), f"TLV {tag:X}")
        children = parse_tlv(value, depth=depth + 1) if first & 0x20 else ()
        out.append(Tlv(tag, value, children))
    return tuple(out)


# --- BCD and VAR helpers ----------------------------------------------------------------------


def bcd_encode(number: int, size: int) -> bytes:
    """``number`` as ``size`` bytes of packed BCD; ValueError if it does not fit."""
    digits = str(number)
    if number < 0 or len(digits) > size * 2:
        raise ValueError(f"{number} does not fit in {size} BCD bytes")
    return bytes.fromhex(digits.rjust(size * 2, "0"))


def bcd_digits(raw: bytes) -> str:
    """The decimal digits of packed BCD; any nibble above 9 is a protocol error."""
    text = raw.hex()
    if not text.isdigit() and text:
        raise DeviceProtocolError(f"not BCD: {text.upper()}")
    return text


def bcd_decode(raw: bytes) -> int:
    """Packed BCD as an integer."""
    return int(bcd_digits(raw) or "0")


def encode_llvar(value: bytes) -> bytes:
    """``Fx Fy`` + value (≤ 99 bytes)."""
    if len(value) > 99:
        raise ValueError("LLVAR value longer than 99 bytes")
    return bytes(0xF0 | int(d) for d in f"{len(value):02d}") + value


def encode_lllvar(value: bytes) -> bytes:
    """``Fx Fy Fz`` + value (≤ 999 bytes)."""
    if len(value) > 999:
        raise ValueError("LLLVAR value longer than 999 bytes")
    return bytes(0xF0 | int(d) for d in f"{len(value):03d}") + value


def encode_pan(pan: str) -> bytes:
    """A PAN for BMP 22 (without LLVAR): digits, ``*`` → nibble E, odd length padded with F."""
    nibbles = "".join("E" if c == "*" else c for c in pan)
    if len(nibbles) % 2:
        nibbles += "F"
    return bytes.fromhex(nibbles)


def _ascii(raw: bytes) -> str:
    return raw.decode("latin-1").rstrip("\x00").strip()


def mask_pan(raw: bytes) -> str:
    """BMP 22 as text: E → ``*``, F skipped; if the terminal did not mask it, all but the last 4."""
    chars: list[str] = []
    for nibble in raw.hex().upper():
        if nibble == "D":  # field separator of EF_ID data: the PAN ends here
            break
        if nibble != "F":
            chars.append(nibble if nibble.isdigit() else "*")
    pan = "".join(chars)
    visible = sum(c.isdigit() for c in pan)
    # PCI DSS shows at most the first six and last four digits; anything more is a leak.
    if "*" not in pan or visible > 10:
        pan = "*" * max(0, len(pan) - 4) + pan[-4:]
    return pan


# --- Messages from the terminal ---------------------------------------------------------------

CARD_BRANDS: Final[dict[int, str]] = {
    0x05: "girocard", 0x06: "mastercard", 0x08: "amex", 0x0A: "visa", 0x0D: "vpay",
    0x2E: "maestro",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class StatusInfo:
    """Decoded Status-Information (04 0F); the PAN is always masked."""

    result_code: int | None = None
    amount_minor: int | None = None
    trace_no: int | None = None
    time_hhmmss: str | None = None
    date_mmdd: str | None = None
    expiry_yymm: str | None = None
    card_seq_no: int | None = None
    payment_type: int | None = None
    masked_pan: str | None = None
    terminal_id: str | None = None
    merchant_no: str | None = None
    auth_attribute: str | None = None
    additional_text: str | None = None
    currency_numeric: int | None = None
    receipt_no: int | None = None
    turnover_no: int | None = None
    card_type: int | None = None
    card_name: str | None = None

    @property
    def approved(self) -> bool:
        """Result code 00."""
        return self.result_code == 0

    @property
    def card_brand(self) -> str | None:
        """A lower-case brand from the ZVT card type, else the terminal's card name."""
        if self.card_type is not None and self.card_type in CARD_BRANDS:
            return CARD_BRANDS[self.card_type]
        return self.card_name


def _first(raw: bytes) -> int:
    return raw[0]


def _tlv_checked(raw: bytes) -> None:
    parse_tlv(raw)  # validated, not kept: the container may carry card data


_STATUS_FIELDS: Final[dict[int, tuple[str, Callable[[bytes], object]]]] = {
    0x27: ("result_code", _first),
    0x04: ("amount_minor", bcd_decode),
    0x0B: ("trace_no", bcd_decode),
    0x0C: ("time_hhmmss", bcd_digits),
    0x0D: ("date_mmdd", bcd_digits),
    0x0E: ("expiry_yymm", bcd_digits),
    0x17: ("card_seq_no", bcd_decode),
    0x19: ("payment_type", _first),
    0x22: ("masked_pan", mask_pan),
    0x29: ("terminal_id", bcd_digits),
    0x2A: ("merchant_no", _ascii),
    0x3B: ("auth_attribute", _ascii),
    0x3C: ("additional_text", _ascii),
    0x49: ("currency_numeric", bcd_decode),
    0x87: ("receipt_no", bcd_decode),
    0x88: ("turnover_no", bcd_decode),
    0x8A: ("card_type", _first),
    0x8B: ("card_name", _ascii),
    0x06: ("", _tlv_checked),
}


def decode_status_info(data: bytes) -> StatusInfo:
    """Decode the data block of a 04 0F; BMPs may come in any order, unknown ones are skipped."""
    fields: dict[str, object] = {}
    for bmp in parse_bmps(data):
        if bmp.id in _STATUS_FIELDS:
            name, convert = _STATUS_FIELDS[bmp.id]
            value = convert(bmp.value)
            if name:
                fields[name] = value
    return StatusInfo(**fields)  # type: ignore[arg-type]  # keys and types come from the table


Step = Literal["insert_card", "enter_pin", "please_wait", "remove_card", "processing", "other"]

_INTERMEDIATE: Final[dict[int, tuple[Step, str]]] = {
    0x00: ("other", "Waiting for amount confirmation"),
    0x01: ("enter_pin", "Please watch PIN pad"),
    0x02: ("enter_pin", "Please watch PIN pad"),
    0x03: ("other", "Not accepted"),
    0x04: ("processing", "Waiting for the host"),
    0x05: ("processing", "Sending auto-reversal"),
    0x06: ("processing", "Sending post-bookings"),
    0x07: ("other", "Card not admitted"),
    0x08: ("other", "Card unknown"),
    0x09: ("other", "Expired card"),
    0x0A: ("insert_card", "Insert card"),
    0x0B: ("remove_card", "Please remove card"),
    0x0C: ("other", "Card not readable"),
    0x0D: ("other", "Processing error"),
    0x0E: ("please_wait", "Please wait"),
    0x0F: ("processing", "Automatic end-of-day"),
    0x10: ("other", "Invalid card"),
    0x12: ("other", "System malfunction"),
    0x13: ("other", "Payment not possible"),
    0x14: ("other", "Credit not sufficient"),
    0x15: ("enter_pin", "Incorrect PIN"),
    0x17: ("please_wait", "Please wait"),
    0x18: ("other", "PIN try limit exceeded"),
    0x1D: ("other", "Declined"),
    0x28: ("please_wait", "Currency selection, please wait"),
    0x29: ("please_wait", "Language selection, please wait"),
    0x2A: ("insert_card", "Insert card"),
    0x2B: ("please_wait", "Emergency transaction, please wait"),
    0x2C: ("please_wait", "Application selection, please wait"),
}


@dataclass(frozen=True, slots=True)
class IntermediateStatus:
    """Decoded Intermediate Status (04 FF): the raw code, a POS step and a display text."""

    code: int
    step: Step
    text: str
    timeout_min: int | None = None


def decode_intermediate(data: bytes) -> IntermediateStatus:
    """Decode the data block of a 04 FF (codes 41..7F mean "... please remove card")."""
    cursor = _Cursor(data)
    code = cursor.byte("intermediate status")
    timeout = None if cursor.done else bcd_decode(cursor.take(1, "intermediate timeout"))
    if not cursor.done:
        parse_bmps(data[cursor.pos :])
    if code in _INTERMEDIATE:
        step, text = _INTERMEDIATE[code]
    elif 0x41 <= code <= 0x7F:
        base = _INTERMEDIATE.get(code - 0x40)
        step = "remove_card"
        prefix = "" if base is None or base[0] == "remove_card" else f"{base[1]}. "
        text = f"{prefix}Please remove card"
    else:
        step, text = "other", f"Status 0x{code:02X}"
    return IntermediateStatus(code, step, text, timeout)


@dataclass(frozen=True, slots=True)
class TerminalStatus:
    """Completion of a Status enquiry: software version and terminal status code (00 = ready)."""

    status_code: int
    sw_version: str | None = None

    @property
    def ready(self) -> bool:
        """Terminal status 00."""
        return self.status_code == 0


def decode_terminal_status(data: bytes) -> TerminalStatus:
    """Decode the Completion after 05 01: ``[<LLLVAR sw-version>] <status> [06 <TLV>]``."""
    cursor = _Cursor(data)
    sw_version = None
    if len(data) >= 4 and all(b >> 4 == 0xF and b & 0xF <= 9 for b in data[:3]):
        sw_version = _ascii(cursor.take(cursor.var_length(3, "SW version"), "SW version"))
    status = cursor.byte("terminal status")
    if not cursor.done:
        parse_bmps(data[cursor.pos :])
    return TerminalStatus(status, sw_version)


def decode_abort(data: bytes) -> int:
    """The result code of an Abort (06 1E) from the terminal."""
    return _Cursor(data).byte("abort result code")


# --- Commands the ECR sends -------------------------------------------------------------------


def password_bcd(password: str) -> bytes:
    """The six-digit password as 3 BCD bytes."""
    if len(password) != 6 or not password.isdigit():
        raise ValueError("ZVT password must be 6 digits")
    return bytes.fromhex(password)


def build_registration(password: str, config_byte: int = 0x08, currency: int = 978) -> Apdu:
    """Registration 06 00: password, config byte, currency code."""
    return Apdu(0x06, 0x00, password_bcd(password) + bytes([config_byte]) + bcd_encode(currency, 2))


def build_authorization(amount_minor: int, currency: int) -> Apdu:
    """Authorization 06 01: BMP 04 amount, BMP 49 currency."""
    if amount_minor <= 0:
        raise ValueError("amount must be positive")
    return Apdu(
        0x06, 0x01, b"\x04" + bcd_encode(amount_minor, 6) + b"\x49" + bcd_encode(currency, 2)
    )


def build_reversal(password: str, receipt_no: int) -> Apdu:
    """Reversal 06 30: password, BMP 87 receipt number of the original payment."""
    return Apdu(0x06, 0x30, password_bcd(password) + b"\x87" + bcd_encode(receipt_no, 2))


def build_abort() -> Apdu:
    """Abort 06 B0 00."""
    return Apdu(0x06, 0xB0)


def build_end_of_day(password: str) -> Apdu:
    """End-of-Day 06 50."""
    return Apdu(0x06, 0x50, password_bcd(password))


def build_status_enquiry(password: str) -> Apdu:
    """Status enquiry 05 01."""
    return Apdu(0x05, 0x01, password_bcd(password))


def build_repeat_receipt(password: str) -> Apdu:
    """Repeat receipt 06 20 with service byte 01: resend the last transaction's 04 0F."""
    return Apdu(0x06, 0x20, password_bcd(password) + b"\x03\x01")


def build_log_off() -> Apdu:
    """Log-off 06 02 00."""
    return Apdu(0x06, 0x02)


def build_ack() -> Apdu:
    """The positive application answer 80 00 00."""
    return Apdu(0x80, 0x00)
