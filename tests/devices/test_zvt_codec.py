"""ZVT codec: the reference bytes of devices.md, BMP/TLV parsing, PAN masking, and fuzzing."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices import zvt_codec as codec
from devices.errors import DeviceProtocolError
from devices.zvt_codec import Apdu, Control, FrameBad, FrameDecoder, FrameOk

# name, the APDU as built or decoded, the frame exactly as in devices.md
REFERENCE = [
    ("auth 12.34 EUR", codec.build_authorization(1234, 978),
     "10 02 06 01 0A 04 00 00 00 00 12 34 49 09 78 10 03 B0 91"),
    ("auth 110.00 EUR (stuffed 10)", codec.build_authorization(11000, 978),
     "10 02 06 01 0A 04 00 00 00 01 10 10 00 49 09 78 10 03 F2 FF"),
    ("ack", codec.build_ack(), "10 02 80 00 00 10 03 F5 1F"),
    ("insert card", Apdu(0x04, 0xFF, b"\x0a"), "10 02 04 FF 01 0A 10 03 F5 7D"),
    ("completion", Apdu(0x06, 0x0F), "10 02 06 0F 00 10 03 C6 33"),
    ("abort 6C", Apdu(0x06, 0x1E, b"\x6c"), "10 02 06 1E 01 6C 10 03 C9 F2"),
    ("declined status", Apdu(0x04, 0x0F, bytes.fromhex("27 05 29 12 34 56 78")),
     "10 02 04 0F 07 27 05 29 12 34 56 78 10 03 56 A5"),
    ("reversal 0042", codec.build_reversal("000000", 42),
     "10 02 06 30 06 00 00 00 87 00 42 10 03 CC C0"),
    ("end of day", codec.build_end_of_day("000000"), "10 02 06 50 03 00 00 00 10 03 FB 37"),
    ("status enquiry", codec.build_status_enquiry("000000"),
     "10 02 05 01 03 00 00 00 10 03 DF DB"),
    ("registration 123456", codec.build_registration("123456", 0xBA, 978),
     "10 02 06 00 06 12 34 56 BA 09 78 10 03 24 C3"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "apdu", "frame_hex"), REFERENCE, ids=[r[0] for r in REFERENCE])
def test_reference_frames_encode_and_decode_byte_exact(
    name: str, apdu: Apdu, frame_hex: str
) -> None:
    frame = bytes.fromhex(frame_hex)
    assert codec.encode_frame(apdu.encode()) == frame
    decoder = FrameDecoder()
    assert decoder.feed(frame) == [FrameOk(apdu.encode())]
    assert codec.decode_apdu(apdu.encode()) == apdu
    assert decoder.discarded == 0


def test_reference_frames_fed_byte_by_byte_and_back_to_back() -> None:
    stream = b"".join(bytes.fromhex(f) for _, _, f in REFERENCE)
    decoder = FrameDecoder()
    events = [e for byte in stream for e in decoder.feed(bytes([byte]))]
    assert events == [FrameOk(a.encode()) for _, a, _ in REFERENCE]


def test_reference_messages_decode() -> None:
    assert codec.decode_intermediate(b"\x0a").step == "insert_card"
    assert codec.decode_abort(b"\x6c") == 0x6C
    info = codec.decode_status_info(bytes.fromhex("27 05 29 12 34 56 78"))
    assert info == codec.StatusInfo(result_code=5, terminal_id="12345678")
    assert not info.approved


def test_fixed_commands() -> None:
    assert codec.build_abort().encode() == bytes.fromhex("06 B0 00")
    assert codec.build_log_off().encode() == bytes.fromhex("06 02 00")
    assert codec.build_repeat_receipt("000000").encode() == bytes.fromhex("06 20 05 00 00 00 03 01")
    assert codec.build_registration("000000").encode() == bytes.fromhex(
        "06 00 06 00 00 00 08 09 78"
    )


def test_crc_check_value() -> None:
    assert codec.crc16_kermit(b"123456789") == 0x2189


def test_decoder_discards_garbage_and_resyncs() -> None:
    frame = bytes.fromhex("10 02 80 00 00 10 03 F5 1F")
    decoder = FrameDecoder()
    events = decoder.feed(b"\x00\xff\x10\x41" + frame + b"\x99" + frame)
    assert events == [FrameOk(b"\x80\x00\x00")] * 2
    assert decoder.discarded == 5


def test_decoder_bad_crc_then_good_frame() -> None:
    bad = bytes.fromhex("10 02 80 00 00 10 03 F5 1E")
    decoder = FrameDecoder()
    events = decoder.feed(bad + bytes.fromhex("10 02 80 00 00 10 03 F5 1F"))
    assert events == [FrameBad("CRC mismatch"), FrameOk(b"\x80\x00\x00")]
    assert decoder.discarded == len(bad)


def test_decoder_controls_restart_dle_error_and_t1_expiry() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"\x06\x15") == [Control.ACK, Control.NAK]
    # a frame restarted inside another: the first is broken, the second decodes
    restarted = bytes.fromhex("10 02 04 FF") + bytes.fromhex("10 02 80 00 00 10 03 F5 1F")
    assert decoder.feed(restarted) == [FrameBad("frame restarted"), FrameOk(b"\x80\x00\x00")]
    assert decoder.feed(bytes.fromhex("10 02 04 10 41")) == [FrameBad("DLE followed by 0x41")]
    assert decoder.feed(bytes.fromhex("10 02 04 FF")) == []
    assert decoder.in_frame
    assert decoder.expire() == FrameBad("T1 gap inside a frame")
    assert not decoder.in_frame
    assert decoder.expire() is None


def test_extended_length_apdu() -> None:
    data = bytes(range(256)) + bytes(44)
    apdu = Apdu(0x06, 0xD3, data)
    raw = apdu.encode()
    assert raw[:5] == bytes.fromhex("06 D3 FF 2C 01")
    assert codec.decode_apdu(raw) == apdu
    assert Apdu(0x06, 0xD3, bytes(255)).encode()[:5] == bytes.fromhex("06 D3 FF FF 00")
    assert Apdu(0x06, 0xD3, bytes(254)).encode()[:3] == bytes.fromhex("06 D3 FE")
    decoder = FrameDecoder()
    assert decoder.feed(codec.encode_frame(raw)) == [FrameOk(raw)]


def test_apdu_splitter_handles_arbitrary_chunks() -> None:
    apdus = [Apdu(0x80, 0x00), Apdu(0x06, 0xD3, bytes(300)), Apdu(0x04, 0xFF, b"\x0a")]
    stream = b"".join(a.encode() for a in apdus)
    splitter = codec.ApduSplitter()
    out = [a for i in range(0, len(stream), 7) for a in splitter.feed(stream[i : i + 7])]
    assert out == apdus
    assert splitter.pending == 0


def test_bmp_parser_var_lengths_and_tlv() -> None:
    text = b"x" * 120
    tlv_long = b"\x1f\x10\x81\x90" + bytes(0x90)
    data = (
        b"\x22" + codec.encode_llvar(b"\x12\x34")
        + b"\x3c" + codec.encode_lllvar(text)
        + b"\x06\x82\x00\x94" + tlv_long
        + b"\x06\x81\x94" + tlv_long
        + b"\x27\x00"
    )  # fmt: skip
    bmps = codec.parse_bmps(data)
    assert [b.id for b in bmps] == [0x22, 0x3C, 0x06, 0x06, 0x27]
    assert bmps[1].value == text
    assert bmps[2].value == tlv_long
    (item,) = codec.parse_tlv(bmps[3].value)
    assert (item.tag, len(item.value)) == (0x1F10, 0x90)


def test_tlv_constructed_and_multibyte_tags() -> None:
    nested = codec.parse_tlv(bytes.fromhex("E4 08 1F 40 01 07 41 02 00 06"))
    assert nested[0].tag == 0xE4
    assert [(c.tag, c.value) for c in nested[0].children] == [
        (0x1F40, b"\x07"),
        (0x41, b"\x00\x06"),
    ]


def test_status_info_any_order_skips_unknown_known_length() -> None:
    data = (
        b"\x87\x00\x42" + b"\x8c\x11" + b"\xba" + bytes(5) + b"\x3b" + b"123456\x00\x00"
        + b"\x04\x00\x00\x00\x00\x12\x34" + b"\x0b\x00\x01\x23" + b"\x0c\x12\x30\x59"
        + b"\x0d\x11\x22" + b"\x0e\x28\x12" + b"\x17\x00\x01" + b"\x19\x70"
        + b"\x2a" + b"MERCHANT0000001" + b"\x3c" + codec.encode_lllvar(b"thanks")
        + b"\x49\x09\x78" + b"\x88\x00\x00\x07" + b"\x8a\x05" + b"\x8b"
        + codec.encode_llvar(b"girocard\x00") + b"\x27\x00" + b"\x06\x03\x41\x01\x05"
    )  # fmt: skip
    info = codec.decode_status_info(data)
    assert info == codec.StatusInfo(
        result_code=0, amount_minor=1234, trace_no=123, time_hhmmss="123059", date_mmdd="1122",
        expiry_yymm="2812", card_seq_no=1, payment_type=0x70, merchant_no="MERCHANT0000001",
        auth_attribute="123456", additional_text="thanks", currency_numeric=978, receipt_no=42,
        turnover_no=7, card_type=5, card_name="girocard",
    )  # fmt: skip
    assert info.approved
    assert info.card_brand == "girocard"


@pytest.mark.parametrize(
    ("pan_bcd", "expected"),
    [
        ("F0 F8 54 13 33 EE EE EE 12 34", "541333******1234"),  # masked by the terminal
        ("F0 F8 54 13 33 00 89 60 12 34", "************1234"),  # faulty terminal: full PAN
        ("F1 F0 67 03 12 34 56 78 90 12 34 5F", "***************2345"),  # odd length, unmasked
        ("F0 F8 54 13 33 00 89 E0 12 34", "************1234"),  # 15 digits visible: a leak
        ("F0 F4 EE EE 12 34", "****1234"),
    ],
)
def test_pan_masking(pan_bcd: str, expected: str) -> None:
    info = codec.decode_status_info(b"\x22" + bytes.fromhex(pan_bcd))
    assert info.masked_pan == expected
    assert "5413330089" not in repr(info)


def test_pan_encoder_round_trip() -> None:
    raw = codec.encode_pan("541333******123")
    assert raw.hex().upper() == "541333EEEEEE123F"
    assert codec.mask_pan(raw) == "541333******123"


def test_intermediate_status_steps() -> None:
    assert codec.decode_intermediate(b"\x15").step == "enter_pin"
    assert codec.decode_intermediate(b"\x15").text == "Incorrect PIN"
    assert codec.decode_intermediate(b"\x17").step == "please_wait"
    assert codec.decode_intermediate(b"\x04").step == "processing"
    removed = codec.decode_intermediate(b"\x4c")
    assert (removed.step, removed.text) == ("remove_card", "Card not readable. Please remove card")
    assert codec.decode_intermediate(b"\x99").step == "other"
    with_timeout = codec.decode_intermediate(b"\x0e\x05\x06\x03\x24\x01\x00")
    assert (with_timeout.step, with_timeout.timeout_min) == ("please_wait", 5)


def test_terminal_status() -> None:
    status = codec.decode_terminal_status(codec.encode_lllvar(b"PT 4.2") + b"\x00")
    assert status == codec.TerminalStatus(0, "PT 4.2")
    assert status.ready
    assert codec.decode_terminal_status(b"\xdc") == codec.TerminalStatus(0xDC, None)


BAD_INPUTS: list[tuple[Callable[[bytes], object], str]] = [
    (codec.decode_apdu, "06"),
    (codec.decode_apdu, "06 01 05 00"),
    (codec.decode_apdu, "06 01 FF 01"),
    (codec.parse_bmps, "7F 00"),  # unknown id, unknown length
    (codec.parse_bmps, "04 00 00"),  # truncated fixed
    (codec.parse_bmps, "22 F1 AB"),  # bad LLVAR byte
    (codec.parse_bmps, "22 F0 F5 00"),  # LLVAR longer than the data
    (codec.parse_bmps, "06 83 00 00 01"),  # unsupported BER length
    (codec.parse_tlv, "1F 81 82 83 84 01 00"),  # tag too long
    (codec.decode_status_info, "04 00 00 00 00 1A 00"),  # not BCD
    (codec.decode_status_info, "06 02 41 05"),  # TLV value overruns
    (codec.decode_intermediate, ""),
    (codec.decode_terminal_status, ""),
    (codec.decode_abort, ""),
]


@pytest.mark.parametrize(("decode", "data_hex"), BAD_INPUTS)
def test_bad_input_raises_protocol_error(decode: Callable[[bytes], object], data_hex: str) -> None:
    with pytest.raises(DeviceProtocolError):
        decode(bytes.fromhex(data_hex))


def test_builders_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="positive"):
        codec.build_authorization(0, 978)
    with pytest.raises(ValueError, match="does not fit"):
        codec.build_authorization(10**12, 978)
    with pytest.raises(ValueError, match="6 digits"):
        codec.build_end_of_day("12345")


# --- fuzzing ------------------------------------------------------------------------------------

PARSERS: list[Callable[[bytes], object]] = [
    codec.decode_apdu, codec.parse_bmps, codec.parse_tlv, codec.decode_status_info,
    codec.decode_intermediate, codec.decode_terminal_status, codec.decode_abort,
]  # fmt: skip

FUZZ = settings(max_examples=300, deadline=500, suppress_health_check=[HealthCheck.too_slow])


def _only_protocol_errors(data: bytes) -> None:
    for parse in PARSERS:
        with contextlib.suppress(DeviceProtocolError):
            parse(data)


@FUZZ
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data: bytes) -> None:
    decoder = FrameDecoder()
    for event in decoder.feed(data):
        if isinstance(event, FrameOk):
            _only_protocol_errors(event.apdu)
    decoder.expire()
    _only_protocol_errors(data)
    splitter = codec.ApduSplitter()
    for apdu in splitter.feed(data):
        _only_protocol_errors(apdu.data)


@st.composite
def _mutated_frames(draw: st.DrawFn) -> bytes:
    frame = bytearray(bytes.fromhex(draw(st.sampled_from([r[2] for r in REFERENCE]))))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(frame)))
        match draw(st.sampled_from(["flip", "insert", "delete"])):
            case "flip" if pos < len(frame):
                frame[pos] ^= draw(st.integers(1, 255))
            case "insert":
                frame.insert(pos, draw(st.integers(0, 255)))
            case "delete" if pos < len(frame):
                del frame[pos]
    return bytes(frame)


@FUZZ
@given(_mutated_frames())
def test_fuzz_mutated_frames(frame: bytes) -> None:
    decoder = FrameDecoder()
    for event in decoder.feed(frame):
        if isinstance(event, FrameOk):
            assert codec.encode_frame(event.apdu) in frame
            _only_protocol_errors(event.apdu)
            _only_protocol_errors(event.apdu[3:])


@FUZZ
@given(
    st.binary(max_size=300).filter(lambda b: b"\x10" not in b),
    st.binary(min_size=3, max_size=400),
)
def test_fuzz_frame_round_trip_after_garbage(garbage: bytes, apdu: bytes) -> None:
    decoder = FrameDecoder()
    events = decoder.feed(garbage + codec.encode_frame(apdu))
    assert events[-1] == FrameOk(apdu)
    assert decoder.discarded == len(garbage) - sum(isinstance(e, Control) for e in events)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(sorted(codec.BMP_LENGTHS)), st.binary(max_size=40))))
def test_fuzz_well_formed_bmps_parse_back(fields: list[tuple[int, bytes]]) -> None:
    data = b""
    expected = []
    for bmp_id, raw in fields:
        kind = codec.BMP_LENGTHS[bmp_id]
        value = raw
        if kind == -2:
            encoded = codec.encode_llvar(value)
        elif kind == -3:
            encoded = codec.encode_lllvar(value)
        elif kind == -1:
            encoded = bytes([len(value)]) + value
        else:
            value = (value + bytes(kind))[:kind]
            encoded = value
        data += bytes([bmp_id]) + encoded
        expected.append(codec.Bmp(bmp_id, value))
    assert list(codec.parse_bmps(data)) == expected
    _only_protocol_errors(data)
