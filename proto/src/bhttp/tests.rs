//! Tests of Binary HTTP: the RFC 9292 and RFC 9458 Appendix A messages byte for byte, the
//! incremental decoders and the streaming encoder, limits and refusals, interoperability with
//! the `bhttp` crate both ways, and property tests (round trips, prefixes, arbitrary input).

use bytes::{Bytes, BytesMut};

use super::{
    decode::{Core, Head},
    *,
};
use proptest::prelude::*;
use std::io::Cursor as IoCursor;

/// Bytes from an RFC hex dump (whitespace ignored).
fn hex(dump: &str) -> Vec<u8> {
    hex::decode(dump.split_whitespace().collect::<String>()).unwrap()
}

// RFC 9292 §5 figures, as published (RFC 9292 = draft-ietf-httpbis-binary-message at
// publication, httpwg/http-extensions). Only the hex columns are copied.

/// RFC 9292 §5.1, "Known-Length Binary Encoding of Request".
const RFC9292_KNOWN_LENGTH_REQUEST: &str = "
    00034745 54056874 74707300 0a2f6865 6c6c6f2e 74787440 6c0a7573 65722d61
    67656e74 34637572 6c2f372e 31362e33 206c6962 6375726c 2f372e31 362e3320
    4f70656e 53534c2f 302e392e 376c207a 6c69622f 312e322e 3304686f 73740f77
    77772e65 78616d70 6c652e63 6f6d0f61 63636570 742d6c61 6e677561 67650665
    6e2c206d 690000";

/// RFC 9292 §5.1, "Indeterminate-Length Binary Encoding of Request" (10 bytes of padding).
const RFC9292_INDETERMINATE_LENGTH_REQUEST: &str = "
    02034745 54056874 74707300 0a2f6865 6c6c6f2e 7478740a 75736572 2d616765
    6e743463 75726c2f 372e3136 2e33206c 69626375 726c2f37 2e31362e 33204f70
    656e5353 4c2f302e 392e376c 207a6c69 622f312e 322e3304 686f7374 0f777777
    2e657861 6d706c65 2e636f6d 0f616363 6570742d 6c616e67 75616765 06656e2c
    206d6900 00000000 00000000 00000000";

/// RFC 9292 §5.2, "Binary Response, including Informational Responses".
const RFC9292_RESPONSE_WITH_INFORMATIONAL: &str = "
    03406607 72756e6e 696e670a 22736c65 65702031 35220040 67046c69 6e6b233c
    2f737479 6c652e63 73733e3b 2072656c 3d707265 6c6f6164 3b206173 3d737479
    6c65046c 696e6b24 3c2f7363 72697074 2e6a733e 3b207265 6c3d7072 656c6f61
    643b2061 733d7363 72697074 0040c804 64617465 1d4d6f6e 2c203237 204a756c
    20323030 39203132 3a32383a 35332047 4d540673 65727665 72064170 61636865
    0d6c6173 742d6d6f 64696669 65641d57 65642c20 3232204a 756c2032 30303920
    31393a31 353a3536 20474d54 04657461 67142233 34616133 38372d64 2d313536
    38656230 30220d61 63636570 742d7261 6e676573 05627974 65730e63 6f6e7465
    6e742d6c 656e6774 68023531 04766172 790f4163 63657074 2d456e63 6f64696e
    670c636f 6e74656e 742d7479 70650a74 6578742f 706c6169 6e003348 656c6c6f
    20576f72 6c642120 4d792063 6f6e7465 6e742069 6e636c75 64657320 61207472
    61696c69 6e672043 524c462e 0d0a0000";

/// RFC 9292 §5.2, "Known-Length Encoding of Response" (the chunked example, with a trailer).
const RFC9292_KNOWN_LENGTH_RESPONSE: &str = "
    0140c800 1d546869 7320636f 6e74656e 7420636f 6e746169 6e732043 524c462e
    0d0a0d07 74726169 6c657204 74657874";

fn rfc_request_head() -> RequestHead {
    RequestHead {
        method: b"GET".to_vec(),
        scheme: b"https".to_vec(),
        authority: Vec::new(),
        path: b"/hello.txt".to_vec(),
        fields: vec![
            Field::new(
                "user-agent",
                "curl/7.16.3 libcurl/7.16.3 OpenSSL/0.9.7l zlib/1.2.3",
            ),
            Field::new("host", "www.example.com"),
            Field::new("accept-language", "en, mi"),
        ],
    }
}

fn rfc_response_head() -> ResponseHead {
    ResponseHead {
        status: 200,
        fields: vec![
            Field::new("date", "Mon, 27 Jul 2009 12:28:53 GMT"),
            Field::new("server", "Apache"),
            Field::new("last-modified", "Wed, 22 Jul 2009 19:15:56 GMT"),
            Field::new("etag", "\"34aa387-d-1568eb00\""),
            Field::new("accept-ranges", "bytes"),
            Field::new("content-length", "51"),
            Field::new("vary", "Accept-Encoding"),
            Field::new("content-type", "text/plain"),
        ],
    }
}

const RFC_RESPONSE_BODY: &[u8] = b"Hello World! My content includes a trailing CRLF.\r\n";

/// Runs the incremental decoder over `input` cut at `cuts`, then signals the end of input.
/// Returns the events (adjacent `Body` pieces merged, since their boundaries carry no
/// meaning) and the outcome.
fn run<H: Head>(
    input: &[u8],
    cuts: &[usize],
    limits: Limits,
    eof: bool,
) -> (Vec<Event<H>>, Result<(), BhttpError>) {
    let mut core = Core::<H>::new(limits);
    let mut events = Vec::new();
    let mut buf = BytesMut::new();
    let mut start = 0;
    let mut ends: Vec<usize> = cuts.iter().map(|&c| c.min(input.len())).collect();
    ends.sort_unstable();
    ends.push(input.len());
    let outcome = (|| {
        for end in ends {
            buf.extend_from_slice(&input[start..end.max(start)]);
            start = end.max(start);
            while let Some(event) = core.decode(&mut buf)? {
                events.push(event);
            }
        }
        if eof {
            while let Some(event) = core.decode_eof(&mut buf)? {
                events.push(event);
            }
        }
        core.finish()
    })();
    (merge(events), outcome)
}

fn merge<H>(events: Vec<Event<H>>) -> Vec<Event<H>> {
    let mut merged: Vec<Event<H>> = Vec::new();
    for event in events {
        match (merged.last_mut(), event) {
            (Some(Event::Body(prev)), Event::Body(next)) => {
                let mut joined = prev.to_vec();
                joined.extend_from_slice(&next);
                *prev = Bytes::from(joined);
            }
            (_, event) => merged.push(event),
        }
    }
    merged
}

fn expected<H>(head: H, body: &[u8]) -> Vec<Event<H>> {
    let mut events = vec![Event::Head(head)];
    if !body.is_empty() {
        events.push(Event::Body(Bytes::copy_from_slice(body)));
    }
    events.push(Event::End);
    events
}

fn streamed_request(head: &RequestHead, chunks: &[&[u8]], padded_len: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut encoder = StreamingEncoder::request(head, &mut out).unwrap();
    for chunk in chunks {
        encoder.body(chunk, &mut out);
    }
    encoder.end(padded_len, &mut out);
    out
}

fn streamed_response(head: &ResponseHead, chunks: &[&[u8]], padded_len: usize) -> Vec<u8> {
    let mut out = BytesMut::new();
    let mut encoder = StreamingEncoder::response(head, &mut out).unwrap();
    for chunk in chunks {
        encoder.body(chunk, &mut out);
    }
    let written = encoder.written();
    encoder.end(padded_len, &mut out);
    assert_eq!(out.len(), (written + 2).max(padded_len));
    out.to_vec()
}

#[test]
fn rfc9292_known_length_request() {
    let bytes = hex(RFC9292_KNOWN_LENGTH_REQUEST);
    let head = rfc_request_head();
    assert_eq!(encode_request(&head, b"", 0).unwrap(), bytes);
    assert_eq!(encoded_request_len(&head, 0), bytes.len());
    assert_eq!(
        decode_request(&bytes, &Limits::DEFAULT).unwrap(),
        (head.clone(), Vec::new())
    );
    // "the last two bytes ... can each be removed without altering the semantics".
    for cut in 1..=2 {
        let truncated = &bytes[..bytes.len() - cut];
        assert_eq!(
            decode_request(truncated, &Limits::DEFAULT).unwrap(),
            (head.clone(), Vec::new())
        );
        assert_eq!(
            run::<RequestHead>(truncated, &[], Limits::DEFAULT, true),
            (expected(head.clone(), b""), Ok(()))
        );
    }
    assert_eq!(
        run::<RequestHead>(&bytes, &[], Limits::DEFAULT, false),
        (expected(head, b""), Ok(()))
    );
}

#[test]
fn rfc9292_indeterminate_length_request() {
    let bytes = hex(RFC9292_INDETERMINATE_LENGTH_REQUEST);
    let head = rfc_request_head();
    assert_eq!(
        streamed_request(&head, &[], bytes.len()),
        bytes,
        "10 bytes of padding included"
    );
    assert_eq!(
        decode_request(&bytes, &Limits::DEFAULT).unwrap(),
        (head.clone(), Vec::new())
    );
    // "anything up to 12 bytes can be removed from this message without affecting its meaning".
    for cut in 0..=12 {
        let truncated = &bytes[..bytes.len() - cut];
        assert_eq!(
            decode_request(truncated, &Limits::DEFAULT).unwrap(),
            (head.clone(), Vec::new()),
            "cut {cut}"
        );
    }
    // The 13th byte is the header section's terminator, which may not be omitted.
    assert_eq!(
        decode_request(&bytes[..bytes.len() - 13], &Limits::DEFAULT),
        Err(BhttpError::Truncated)
    );
}

#[test]
fn rfc9292_response_with_informational_responses() {
    let bytes = hex(RFC9292_RESPONSE_WITH_INFORMATIONAL);
    let head = rfc_response_head();
    assert_eq!(
        decode_response(&bytes, &Limits::DEFAULT).unwrap(),
        (head.clone(), RFC_RESPONSE_BODY.to_vec())
    );
    assert_eq!(
        run::<ResponseHead>(&bytes, &[], Limits::DEFAULT, false),
        (expected(head.clone(), RFC_RESPONSE_BODY), Ok(()))
    );
    // Our encoder writes no informational responses; from the final status on, its
    // bytes are the RFC's.
    let final_status = bytes.windows(2).position(|w| w == [0x40, 0xc8]).unwrap();
    let mut without_informational = vec![0x03];
    without_informational.extend_from_slice(&bytes[final_status..]);
    assert_eq!(
        streamed_response(&head, &[RFC_RESPONSE_BODY], 0),
        without_informational
    );
}

#[test]
fn rfc9292_known_length_response_with_trailer() {
    let bytes = hex(RFC9292_KNOWN_LENGTH_RESPONSE);
    let head = ResponseHead {
        status: 200,
        fields: Vec::new(),
    };
    let body = b"This content contains CRLF.\r\n";
    // The trailer ("trailer: text") is validated and dropped.
    assert_eq!(
        decode_response(&bytes, &Limits::DEFAULT).unwrap(),
        (head.clone(), body.to_vec())
    );
    // Our encoder writes the same bytes with an empty trailer section instead.
    let trailer_len = 14;
    let mut without_trailer = bytes[..bytes.len() - trailer_len].to_vec();
    without_trailer.push(0);
    assert_eq!(encode_response(&head, body, 0).unwrap(), without_trailer);
    assert_eq!(
        encoded_response_len(&head, body.len()),
        without_trailer.len()
    );
}

/// RFC 9458 Appendix A's inner messages omit everything after the control data.
#[test]
fn rfc9458_appendix_a_inner_messages() {
    let request = hex("00034745540568747470730b6578616d706c652e636f6d012f");
    let head = RequestHead {
        method: b"GET".to_vec(),
        scheme: b"https".to_vec(),
        authority: b"example.com".to_vec(),
        path: b"/".to_vec(),
        fields: Vec::new(),
    };
    assert_eq!(
        decode_request(&request, &Limits::DEFAULT).unwrap(),
        (head.clone(), Vec::new())
    );
    assert_eq!(
        run::<RequestHead>(&request, &[], Limits::DEFAULT, true),
        (expected(head, b""), Ok(()))
    );
    // Without the end of input the message is not known to be complete.
    assert_eq!(
        run::<RequestHead>(&request, &[], Limits::DEFAULT, false).1,
        Err(BhttpError::Truncated)
    );

    let response = hex("0140c8");
    let head = ResponseHead {
        status: 200,
        fields: Vec::new(),
    };
    assert_eq!(
        decode_response(&response, &Limits::DEFAULT).unwrap(),
        (head.clone(), Vec::new())
    );
    assert_eq!(
        run::<ResponseHead>(&response, &[], Limits::DEFAULT, true),
        (expected(head, b""), Ok(()))
    );
}

#[test]
fn public_decoders_stream_body_before_the_chunk_is_complete() {
    let head = ResponseHead {
        status: 200,
        fields: vec![Field::new("content-type", "text/event-stream")],
    };
    let chunk = [b'x'; 1000];
    let bytes = streamed_response(&head, &[&chunk], 0);
    let body_start = bytes.len() - chunk.len() - 2;
    let mut decoder = ResponseDecoder::default();
    let mut buf = BytesMut::from(&bytes[..body_start + 10]);
    assert_eq!(decoder.decode(&mut buf).unwrap(), Some(Event::Head(head)));
    assert_eq!(
        decoder.decode(&mut buf).unwrap(),
        Some(Event::Body(Bytes::from_static(&[b'x'; 10])))
    );
    assert_eq!(decoder.decode(&mut buf).unwrap(), None);
    assert!(buf.is_empty());
    assert_eq!(decoder.finish(), Err(BhttpError::Truncated));
    buf.extend_from_slice(&bytes[body_start + 10..]);
    assert_eq!(
        decoder.decode(&mut buf).unwrap(),
        Some(Event::Body(Bytes::from_static(&[b'x'; 990])))
    );
    assert_eq!(decoder.decode(&mut buf).unwrap(), Some(Event::End));
    assert_eq!(decoder.decode(&mut buf).unwrap(), None);
    assert_eq!(decoder.finish(), Ok(()));
    assert_eq!(decoder.decode_eof(&mut buf).unwrap(), None);

    let mut requests = RequestDecoder::new(Limits::DEFAULT);
    let mut buf = BytesMut::from(&hex(RFC9292_KNOWN_LENGTH_REQUEST)[..]);
    assert!(matches!(
        requests.decode(&mut buf).unwrap(),
        Some(Event::Head(_))
    ));
    assert_eq!(requests.decode(&mut buf).unwrap(), Some(Event::End));
    assert_eq!(requests.finish(), Ok(()));
}

#[test]
fn streaming_encoder_framing() {
    let head = ResponseHead {
        status: 200,
        fields: Vec::new(),
    };
    let mut out = Vec::new();
    let mut encoder = StreamingEncoder::response(&head, &mut out).unwrap();
    assert_eq!(out, [0x03, 0x40, 0xc8, 0x00]);
    encoder.body(b"", &mut out);
    assert_eq!(
        out.len(),
        4,
        "an empty piece writes nothing (a zero length ends the content)"
    );
    encoder.body(b"hi", &mut out);
    assert_eq!(out[4..], [0x02, b'h', b'i']);
    encoder.end(10, &mut out);
    assert_eq!(out[7..], [0x00, 0x00, 0x00]);
    assert_eq!(out.len(), 10);

    // Uppercase names are written lowercased.
    let head = ResponseHead {
        status: 204,
        fields: vec![Field::new("X-Id", "1")],
    };
    let mut out = Vec::new();
    StreamingEncoder::response(&head, &mut out)
        .unwrap()
        .end(0, &mut out);
    assert_eq!(
        out,
        [
            0x03, 0x40, 0xcc, 0x04, b'x', b'-', b'i', b'd', 0x01, b'1', 0x00, 0x00, 0x00
        ]
    );
}

#[test]
fn encoders_refuse_invalid_heads() {
    let mut head = ResponseHead {
        status: 101,
        fields: Vec::new(),
    };
    assert_eq!(
        encode_response(&head, b"", 0),
        Err(BhttpError::InvalidStatus(101))
    );
    assert_eq!(
        StreamingEncoder::response(&head, &mut Vec::new()).err(),
        Some(BhttpError::InvalidStatus(101))
    );
    head.status = 600;
    assert_eq!(
        encode_response(&head, b"", 0),
        Err(BhttpError::InvalidStatus(600))
    );
    head.status = 200;
    for (name, value) in [
        (":status", "200"),
        ("bad name", "x"),
        ("", "x"),
        ("x", "a\r\nb"),
        ("x", " lead"),
        ("x", "trail\t"),
        ("x", "nul\0"),
    ] {
        head.fields = vec![Field::new(name, value)];
        assert!(
            matches!(
                encode_response(&head, b"", 0),
                Err(BhttpError::Malformed(_))
            ),
            "{name:?}: {value:?}"
        );
    }
    let mut request = rfc_request_head();
    request.path = b"/a b".to_vec();
    assert_eq!(
        encode_request(&request, b"", 0),
        Err(BhttpError::Malformed("invalid path"))
    );
    request.path = b"/".to_vec();
    request.method = b"G T".to_vec();
    assert_eq!(
        encode_request(&request, b"", 0),
        Err(BhttpError::Malformed("invalid method"))
    );
    request.method = b"GET".to_vec();
    request.scheme = b"1http".to_vec();
    assert_eq!(
        StreamingEncoder::request(&request, &mut Vec::new()).err(),
        Some(BhttpError::Malformed("invalid scheme"))
    );
    request.scheme = b"https".to_vec();
    request.authority = b"a\nb".to_vec();
    assert_eq!(
        encode_request(&request, b"", 0),
        Err(BhttpError::Malformed("invalid authority"))
    );
}

#[test]
fn decoders_refuse_invalid_messages() {
    let cases: [(&str, BhttpError); 9] = [
        ("01", BhttpError::UnknownFraming(1)),
        ("04", BhttpError::UnknownFraming(4)),
        // A field with an empty name (known-length).
        (
            "00 03474554 0468747470 00 012f 02 0000",
            BhttpError::Malformed("invalid field name"),
        ),
        // A pseudo-field.
        (
            "00 03474554 0468747470 00 012f 0a 073a6d6574686f64 0150",
            BhttpError::Malformed("invalid field name"),
        ),
        // A field value with a CR.
        (
            "00 03474554 0468747470 00 012f 05 0178 020d0a",
            BhttpError::Malformed("invalid field value"),
        ),
        // A field line that runs past the end of its section.
        (
            "00 03474554 0468747470 00 012f 03 0178 0278",
            BhttpError::Malformed("field line overruns its section"),
        ),
        // A method with a space.
        (
            "00 03472054 0468747470 00 012f",
            BhttpError::Malformed("invalid method"),
        ),
        // Non-zero padding after a complete message.
        (
            "00 03474554 0468747470 00 012f 00 00 00 00 00 01",
            BhttpError::NonZeroPadding,
        ),
        // Truncated inside a chunk.
        (
            "02 03474554 0468747470 00 012f 00 05 6869",
            BhttpError::Truncated,
        ),
    ];
    for (dump, error) in cases {
        let bytes = hex(dump);
        assert_eq!(
            decode_request(&bytes, &Limits::DEFAULT),
            Err(error.clone()),
            "{dump}"
        );
        assert_eq!(
            run::<RequestHead>(&bytes, &[], Limits::DEFAULT, true).1,
            Err(error),
            "{dump}"
        );
    }

    let responses: [(&str, BhttpError); 6] = [
        ("00", BhttpError::UnknownFraming(0)),
        ("01 40 63", BhttpError::InvalidStatus(99)),
        ("01 42 58", BhttpError::InvalidStatus(600)),
        (
            "03 c0ffffffffffffff",
            BhttpError::InvalidStatus(0x00ff_ffff_ffff_ffff),
        ),
        // Only informational responses: the final one is missing.
        ("03 4066 00", BhttpError::Truncated),
        ("01 4066 00", BhttpError::Truncated),
    ];
    for (dump, error) in responses {
        let bytes = hex(dump);
        assert_eq!(
            decode_response(&bytes, &Limits::DEFAULT),
            Err(error.clone()),
            "{dump}"
        );
        assert_eq!(
            run::<ResponseHead>(&bytes, &[], Limits::DEFAULT, true).1,
            Err(error),
            "{dump}"
        );
    }
}

#[test]
fn uppercase_field_names_are_lowercased() {
    // RFC 9292 takes field names from RFC 9110 (tokens, any case); HTTP names are
    // case-insensitive, so we normalise.
    let bytes = hex("01 40c8 09 04486f7374 0378797a");
    let (head, _) = decode_response(&bytes, &Limits::DEFAULT).unwrap();
    assert_eq!(head.fields, vec![Field::new("host", "xyz")]);
}

#[test]
fn limits_are_enforced_before_buffering() {
    let limits = Limits {
        max_field_section: 64,
        max_fields: 2,
        max_body: 100,
    };
    // Each case holds only a length prefix: the error comes before the bytes it announces.
    let requests: [(&str, BhttpError); 4] = [
        // A 1 GiB method.
        ("00 bfffffff", BhttpError::FieldSectionTooLarge),
        // A 65-byte known-length header section.
        (
            "00 03474554 0468747470 00 012f 4041",
            BhttpError::FieldSectionTooLarge,
        ),
        // Known-length content of 101 bytes.
        (
            "00 03474554 0468747470 00 012f 00 4065",
            BhttpError::BodyTooLarge,
        ),
        // An indeterminate-length field name of 100 bytes.
        (
            "02 03474554 0468747470 00 012f 4064",
            BhttpError::FieldSectionTooLarge,
        ),
    ];
    for (dump, error) in requests {
        let mut decoder = RequestDecoder::new(limits);
        let mut buf = BytesMut::from(&hex(dump)[..]);
        let mut result = decoder.decode(&mut buf);
        while let Ok(Some(_)) = result {
            result = decoder.decode(&mut buf);
        }
        assert_eq!(result, Err(error.clone()), "{dump}");
        // Errors are sticky.
        assert_eq!(
            decoder.decode(&mut BytesMut::from(&[0u8; 4][..])),
            Err(error.clone())
        );
        assert_eq!(decoder.finish(), Err(error));
    }

    // Field count, in header and trailer sections of both framings.
    let three = vec![
        Field::new("a", "1"),
        Field::new("b", "2"),
        Field::new("c", "3"),
    ];
    let head = ResponseHead {
        status: 200,
        fields: three,
    };
    let known = encode_response(&head, b"", 0).unwrap();
    assert_eq!(
        decode_response(&known, &limits),
        Err(BhttpError::TooManyFields)
    );
    let streamed = streamed_response(&head, &[], 0);
    assert_eq!(
        decode_response(&streamed, &limits),
        Err(BhttpError::TooManyFields)
    );
    let two = ResponseHead {
        status: 200,
        fields: head.fields[..2].to_vec(),
    };
    assert!(decode_response(&encode_response(&two, b"", 0).unwrap(), &limits).is_ok());
    // Cumulative size of an indeterminate-length section.
    let big = ResponseHead {
        status: 200,
        fields: vec![
            Field::new("a", "x".repeat(30)),
            Field::new("b", "y".repeat(30)),
        ],
    };
    assert_eq!(
        decode_response(&streamed_response(&big, &[], 0), &limits),
        Err(BhttpError::FieldSectionTooLarge)
    );
    // Indeterminate-length content is not limited by max_body.
    let long = streamed_response(&two, &[&[7; 80], &[8; 80]], 0);
    assert_eq!(decode_response(&long, &limits).unwrap().1.len(), 160);
    assert_eq!(
        decode_response(&encode_response(&two, &[7; 101], 0).unwrap(), &limits),
        Err(BhttpError::BodyTooLarge)
    );
}

#[test]
fn trailers_are_accepted_and_dropped() {
    let mut theirs = bhttp::Message::response(bhttp::StatusCode::try_from(200u16).unwrap());
    theirs.put_header("a", "1");
    theirs.write_content(b"body");
    theirs.put_trailer("checksum", "abc");
    for mode in [bhttp::Mode::KnownLength, bhttp::Mode::IndeterminateLength] {
        let mut bytes = Vec::new();
        theirs.write_bhttp(mode, &mut bytes).unwrap();
        let head = ResponseHead {
            status: 200,
            fields: vec![Field::new("a", "1")],
        };
        assert_eq!(
            decode_response(&bytes, &Limits::DEFAULT).unwrap(),
            (head.clone(), b"body".to_vec())
        );
        assert_eq!(
            run::<ResponseHead>(&bytes, &[3, 9], Limits::DEFAULT, false),
            (expected(head, b"body"), Ok(()))
        );
    }
}

/// Every strict prefix of an RFC message fails `finish`; at the end of input, exactly the
/// prefixes RFC 9292 §3.8 allows are accepted, reading the omitted parts as empty.
#[test]
fn rfc_message_prefixes() {
    let response = hex(RFC9292_RESPONSE_WITH_INFORMATIONAL);
    let final_status = response.windows(2).position(|w| w == [0x40, 0xc8]).unwrap();
    let body_start = response.len() - RFC_RESPONSE_BODY.len() - 3;
    let without_fields = ResponseHead {
        status: 200,
        fields: Vec::new(),
    };
    let allowed = [
        // Header section, content and trailers omitted.
        (final_status + 2, (without_fields, Vec::new())),
        // Content and trailers omitted.
        (body_start, (rfc_response_head(), Vec::new())),
        // Trailers omitted.
        (
            response.len() - 1,
            (rfc_response_head(), RFC_RESPONSE_BODY.to_vec()),
        ),
    ];
    for cut in 0..response.len() {
        let prefix = &response[..cut];
        assert_eq!(
            run::<ResponseHead>(prefix, &[], Limits::DEFAULT, false).1,
            Err(BhttpError::Truncated)
        );
        let expected = allowed
            .iter()
            .find(|(at, _)| *at == cut)
            .map(|(_, message)| message.clone());
        let decoded = decode_response(prefix, &Limits::DEFAULT);
        match expected {
            Some(message) => assert_eq!(decoded, Ok(message), "cut {cut}"),
            None => assert_eq!(decoded, Err(BhttpError::Truncated), "cut {cut}"),
        }
    }
}

// --- Interoperability with the `bhttp` crate (Martin Thomson, RFC 9292's editor) ---

fn their_request(head: &RequestHead, body: &[u8]) -> bhttp::Message {
    let mut message = bhttp::Message::request(
        head.method.clone(),
        head.scheme.clone(),
        head.authority.clone(),
        head.path.clone(),
    );
    for field in &head.fields {
        message.put_header(field.name.clone(), field.value.clone());
    }
    message.write_content(body);
    message
}

fn their_response(head: &ResponseHead, body: &[u8]) -> bhttp::Message {
    let mut message = bhttp::Message::response(bhttp::StatusCode::try_from(head.status).unwrap());
    for field in &head.fields {
        message.put_header(field.name.clone(), field.value.clone());
    }
    message.write_content(body);
    message
}

fn their_fields(message: &bhttp::Message) -> Vec<Field> {
    message
        .header()
        .fields()
        .iter()
        .map(|f| Field::new(f.name(), f.value()))
        .collect()
}

fn read_theirs(bytes: &[u8]) -> bhttp::Message {
    bhttp::Message::read_bhttp(&mut IoCursor::new(bytes)).unwrap()
}

fn check_their_request(bytes: &[u8], head: &RequestHead, body: &[u8]) {
    let theirs = read_theirs(bytes);
    let control = theirs.control();
    assert_eq!(control.method(), Some(&head.method[..]));
    assert_eq!(control.scheme(), Some(&head.scheme[..]));
    // `bhttp` reports empty values as absent.
    assert_eq!(control.authority().unwrap_or_default(), head.authority);
    assert_eq!(control.path().unwrap_or_default(), head.path);
    assert_eq!(their_fields(&theirs), head.fields);
    assert_eq!(theirs.content(), body);
}

fn check_their_response(bytes: &[u8], head: &ResponseHead, body: &[u8]) {
    let theirs = read_theirs(bytes);
    assert_eq!(
        theirs.control().status().map(bhttp::StatusCode::code),
        Some(head.status)
    );
    assert_eq!(their_fields(&theirs), head.fields);
    assert_eq!(theirs.content(), body);
}

// --- Property tests ---

fn field() -> impl Strategy<Value = Field> {
    ("[a-z][a-z0-9-]{0,12}", "([!-~]([ -~]{0,20}[!-~])?)?")
        .prop_map(|(name, value)| Field::new(name, value))
}

fn request_head() -> impl Strategy<Value = RequestHead> {
    (
        "[A-Z]{1,7}",
        "https?",
        "([a-z0-9.-]{1,20}(:[0-9]{1,5})?)?",
        "/[!-~]{0,40}",
        proptest::collection::vec(field(), 0..6),
    )
        .prop_map(|(method, scheme, authority, path, fields)| RequestHead {
            method: method.into_bytes(),
            scheme: scheme.into_bytes(),
            authority: authority.into_bytes(),
            path: path.into_bytes(),
            fields,
        })
}

fn response_head() -> impl Strategy<Value = ResponseHead> {
    (200u16..600, proptest::collection::vec(field(), 0..6))
        .prop_map(|(status, fields)| ResponseHead { status, fields })
}

fn chunks() -> impl Strategy<Value = Vec<Vec<u8>>> {
    proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..4)
}

fn cuts() -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(0usize..1500, 0..12)
}

fn concat(chunks: &[Vec<u8>]) -> Vec<u8> {
    chunks.concat()
}

fn refs(chunks: &[Vec<u8>]) -> Vec<&[u8]> {
    chunks.iter().map(Vec::as_slice).collect()
}

proptest! {
    /// Known and indeterminate framing, any padding, any split of the input: the same
    /// events, the whole-message decoder agrees, and the `bhttp` crate reads our bytes.
    #[test]
    fn request_round_trip(head in request_head(), chunks in chunks(), pad in 0usize..1200, cuts in cuts(), streamed in any::<bool>()) {
        let body = concat(&chunks);
        let bytes = if streamed {
            streamed_request(&head, &refs(&chunks), pad)
        } else {
            let bytes = encode_request(&head, &body, pad).unwrap();
            prop_assert_eq!(bytes.len(), encoded_request_len(&head, body.len()).max(pad));
            bytes
        };
        prop_assert_eq!(run::<RequestHead>(&bytes, &cuts, Limits::DEFAULT, false), (expected(head.clone(), &body), Ok(())));
        prop_assert_eq!(decode_request(&bytes, &Limits::DEFAULT), Ok((head.clone(), body.clone())));
        check_their_request(&bytes, &head, &body);
    }

    #[test]
    fn response_round_trip(head in response_head(), chunks in chunks(), pad in 0usize..1200, cuts in cuts(), streamed in any::<bool>()) {
        let body = concat(&chunks);
        let bytes = if streamed {
            streamed_response(&head, &refs(&chunks), pad)
        } else {
            let bytes = encode_response(&head, &body, pad).unwrap();
            prop_assert_eq!(bytes.len(), encoded_response_len(&head, body.len()).max(pad));
            bytes
        };
        prop_assert_eq!(run::<ResponseHead>(&bytes, &cuts, Limits::DEFAULT, false), (expected(head.clone(), &body), Ok(())));
        prop_assert_eq!(decode_response(&bytes, &Limits::DEFAULT), Ok((head.clone(), body.clone())));
        check_their_response(&bytes, &head, &body);
    }

    /// What the `bhttp` crate writes, in either framing, our decoders read.
    #[test]
    fn reads_their_messages(request in request_head(), response in response_head(), body in proptest::collection::vec(any::<u8>(), 0..300), cuts in cuts()) {
        for mode in [bhttp::Mode::KnownLength, bhttp::Mode::IndeterminateLength] {
            let mut bytes = Vec::new();
            their_request(&request, &body).write_bhttp(mode, &mut bytes).unwrap();
            prop_assert_eq!(run::<RequestHead>(&bytes, &cuts, Limits::DEFAULT, false), (expected(request.clone(), &body), Ok(())));
            prop_assert_eq!(decode_request(&bytes, &Limits::DEFAULT), Ok((request.clone(), body.clone())));

            let mut bytes = Vec::new();
            their_response(&response, &body).write_bhttp(mode, &mut bytes).unwrap();
            prop_assert_eq!(run::<ResponseHead>(&bytes, &cuts, Limits::DEFAULT, false), (expected(response.clone(), &body), Ok(())));
            prop_assert_eq!(decode_response(&bytes, &Limits::DEFAULT), Ok((response.clone(), body.clone())));
        }
    }

    /// No strict prefix of a message completes it: `finish` fails. At the end of input
    /// (`decode_eof`), a prefix is accepted only where RFC 9292 §3.8 allows an omission,
    /// and then it never yields part of the content: the body is all or nothing, and the
    /// fields are all or nothing.
    #[test]
    fn prefixes_never_complete(head in response_head(), chunks in chunks(), streamed in any::<bool>()) {
        let body = concat(&chunks);
        let bytes = if streamed { streamed_response(&head, &refs(&chunks), 0) } else { encode_response(&head, &body, 0).unwrap() };
        let mut accepted = 0;
        for cut in 0..bytes.len() {
            let prefix = &bytes[..cut];
            prop_assert_eq!(run::<ResponseHead>(prefix, &[], Limits::DEFAULT, false).1, Err(BhttpError::Truncated));
            let (events, outcome) = run::<ResponseHead>(prefix, &[], Limits::DEFAULT, true);
            let whole = decode_response(prefix, &Limits::DEFAULT);
            match outcome {
                Err(error) => {
                    prop_assert_eq!(&error, &BhttpError::Truncated);
                    prop_assert_eq!(whole, Err(error));
                }
                Ok(()) => {
                    accepted += 1;
                    let (got_head, got_body) = whole.unwrap();
                    prop_assert_eq!(events, expected(got_head.clone(), &got_body));
                    prop_assert_eq!(got_head.status, head.status);
                    prop_assert!(got_head.fields.is_empty() || got_head.fields == head.fields);
                    prop_assert!(got_body.is_empty() || (got_body == body && got_head.fields == head.fields));
                }
            }
        }
        // After the control data, after the header section, after the content.
        prop_assert!(accepted <= 3);
    }

    /// Arbitrary input never panics, and the whole-message and incremental decoders
    /// reach the same verdict however the input is split.
    #[test]
    fn arbitrary_input(bytes in proptest::collection::vec(any::<u8>(), 0..400), cuts in cuts(), first in 0u8..4) {
        let mut bytes = bytes;
        if let Some(b) = bytes.first_mut() {
            *b = first; // Reach past the framing indicator most of the time.
        }
        let limits = Limits { max_field_section: 300, max_fields: 8, max_body: 300 };
        let whole = decode_response(&bytes, &limits);
        let (events, outcome) = run::<ResponseHead>(&bytes, &cuts, limits, true);
        match whole {
            Ok((head, body)) => prop_assert_eq!((events, outcome), (expected(head, &body), Ok(()))),
            Err(error) => prop_assert_eq!(outcome, Err(error)),
        }
        let whole = decode_request(&bytes, &limits);
        let (events, outcome) = run::<RequestHead>(&bytes, &cuts, limits, true);
        match whole {
            Ok((head, body)) => prop_assert_eq!((events, outcome), (expected(head, &body), Ok(()))),
            Err(error) => prop_assert_eq!(outcome, Err(error)),
        }
    }

    /// Random edits of valid messages (which reach every state) never panic either.
    #[test]
    fn edited_messages(head in request_head(), body in proptest::collection::vec(any::<u8>(), 0..100), streamed in any::<bool>(),
                       edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4), cuts in cuts()) {
        let mut bytes = if streamed { streamed_request(&head, &[&body], 0) } else { encode_request(&head, &body, 0).unwrap() };
        for (at, byte) in edits {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        let whole = decode_request(&bytes, &Limits::DEFAULT);
        let (events, outcome) = run::<RequestHead>(&bytes, &cuts, Limits::DEFAULT, true);
        match whole {
            Ok((head, body)) => prop_assert_eq!((events, outcome), (expected(head, &body), Ok(()))),
            Err(error) => prop_assert_eq!(outcome, Err(error)),
        }
    }
}
