//! A parser of Server-Sent Events (the `text/event-stream` format of the HTML standard), for the
//! coordinator's control stream `GET /gpu/control/{service_id}`.
//!
//! Pure: bytes in, events out. It follows the standard's rules where they matter to a client that
//! resumes: lines end with `\n`, `\r\n` or `\r` (also split across chunks), a line starting with `:`
//! is a comment (the keep-alives), `data` lines are joined with `\n`, an event is dispatched at a
//! blank line and only when it has data, and the last event id (what a reconnect sends as
//! `Last-Event-ID`) is taken from the `id` field at the blank line that ends an event, whether or not
//! the event has data (an `id` with NUL is ignored). An event cut off before its blank line is
//! neither dispatched nor counted as seen: the reconnect asks for it again.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SseEvent {
    /// The `event` field; empty when the event named none (the standard's `message`).
    pub(crate) event: String,
    pub(crate) data: String,
    /// The last event id when the event was dispatched (set by this event or an earlier one).
    pub(crate) id: Option<String>,
}

/// The parser's state between chunks.
#[derive(Debug, Default)]
pub(crate) struct SseParser {
    /// The bytes of a line not yet ended.
    line: Vec<u8>,
    /// The previous chunk ended in `\r`: a `\n` that starts the next one belongs to that line end.
    after_cr: bool,
    /// Whether the stream's first line was seen (a leading byte order mark is dropped).
    started: bool,
    event: String,
    data: String,
    has_data: bool,
    /// The id fields seen so far (the standard's "last event ID buffer").
    id_buffer: Option<String>,
    /// The id as of the last blank line (the standard's "last event ID string").
    last_event_id: Option<String>,
}

impl SseParser {
    /// A parser for a stream opened again with `Last-Event-ID: last_event_id`.
    pub(crate) fn resuming(last_event_id: Option<String>) -> SseParser {
        SseParser {
            id_buffer: last_event_id.clone(),
            last_event_id,
            ..SseParser::default()
        }
    }

    /// Feeds the next chunk of the body; returns the events it completes, in order.
    pub(crate) fn push(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        let mut events = Vec::new();
        let mut rest = chunk;
        if self.after_cr && !rest.is_empty() {
            self.after_cr = false;
            if rest[0] == b'\n' {
                rest = &rest[1..];
            }
        }
        while let Some(end) = rest.iter().position(|b| *b == b'\n' || *b == b'\r') {
            self.line.extend_from_slice(&rest[..end]);
            let line = std::mem::take(&mut self.line);
            if rest[end] == b'\r' {
                match rest.get(end + 1) {
                    Some(b'\n') => rest = &rest[end + 2..],
                    Some(_) => rest = &rest[end + 1..],
                    None => {
                        self.after_cr = true;
                        rest = &[];
                    }
                }
            } else {
                rest = &rest[end + 1..];
            }
            if let Some(event) = self.line(&line) {
                events.push(event);
            }
        }
        self.line.extend_from_slice(rest);
        events
    }

    /// The id of the last event seen (the `Last-Event-ID` to resume from); `None` before any, or
    /// after an empty `id` reset it.
    pub(crate) fn last_event_id(&self) -> Option<&str> {
        self.last_event_id.as_deref().filter(|id| !id.is_empty())
    }

    /// Handles one complete line; an event when it is a blank line that ends one.
    fn line(&mut self, raw: &[u8]) -> Option<SseEvent> {
        let mut text = String::from_utf8_lossy(raw);
        if !self.started {
            self.started = true;
            if let Some(stripped) = text.strip_prefix('\u{feff}') {
                text = stripped.to_owned().into();
            }
        }
        if text.is_empty() {
            return self.dispatch();
        }
        if text.starts_with(':') {
            return None;
        }
        let (field, value) = match text.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (text.as_ref(), ""),
        };
        match field {
            "event" => self.event = value.to_owned(),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "id" if !value.contains('\0') => self.id_buffer = Some(value.to_owned()),
            // `retry` (the reconnection time) is the client's own business; others are ignored.
            _ => {}
        }
        None
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        self.last_event_id.clone_from(&self.id_buffer);
        let event = std::mem::take(&mut self.event);
        let data = std::mem::take(&mut self.data);
        if !std::mem::take(&mut self.has_data) {
            return None;
        }
        Some(SseEvent {
            event,
            data,
            id: self.last_event_id().map(str::to_owned),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(event: &str, data: &str, id: Option<&str>) -> SseEvent {
        SseEvent {
            event: event.to_owned(),
            data: data.to_owned(),
            id: id.map(str::to_owned),
        }
    }

    /// What the coordinator sends: a comment first, then named events with an id and JSON data,
    /// keep-alive comments between them.
    #[test]
    fn parses_the_coordinators_control_stream() {
        let mut parser = SseParser::default();
        let body = ": control orders of `asr`\n\n\
                    event: pause\nid: 41\ndata: {\"action\":\"pause\",\"request_id\":\"asr-1\"}\n\n\
                    :\n\n\
                    event: resume\nid: 57\ndata: {\"action\":\"resume\"}\n\n";
        let events = parser.push(body.as_bytes());
        assert_eq!(
            events,
            vec![
                event(
                    "pause",
                    "{\"action\":\"pause\",\"request_id\":\"asr-1\"}",
                    Some("41")
                ),
                event("resume", "{\"action\":\"resume\"}", Some("57")),
            ]
        );
        assert_eq!(parser.last_event_id(), Some("57"));
    }

    /// A body cut anywhere, even inside `\r\n`, gives the same events as in one piece.
    #[test]
    fn events_split_across_chunks_at_every_byte() {
        let body = "event: pause\r\nid: 7\r\ndata: a\r\ndata: b\r\n\r\nid: 8\rdata:c\r\r";
        let whole = SseParser::default().push(body.as_bytes());
        assert_eq!(
            whole,
            vec![event("pause", "a\nb", Some("7")), event("", "c", Some("8"))]
        );
        for cut in 0..=body.len() {
            let mut parser = SseParser::default();
            let mut events = parser.push(&body.as_bytes()[..cut]);
            events.extend(parser.push(&body.as_bytes()[cut..]));
            assert_eq!(events, whole, "cut at {cut}");
            assert_eq!(parser.last_event_id(), Some("8"), "cut at {cut}");
        }
        let mut parser = SseParser::default();
        let bytewise: Vec<SseEvent> = body
            .as_bytes()
            .iter()
            .flat_map(|b| parser.push(std::slice::from_ref(b)))
            .collect();
        assert_eq!(bytewise, whole);
    }

    /// An event is only complete at its blank line: a stream cut before it dispatches nothing, and
    /// its id is not taken either (the reconnect asks for it again).
    #[test]
    fn an_unfinished_event_is_not_dispatched() {
        let mut parser = SseParser::default();
        assert_eq!(
            parser.push(b"id: 3\ndata: {}\n\nid: 4\ndata: {\"half\"}\n"),
            vec![event("", "{}", Some("3"))]
        );
        assert_eq!(parser.last_event_id(), Some("3"));
        // The reconnect resumes after 3, and 4 comes again, whole.
        let mut parser = SseParser::resuming(parser.last_event_id().map(str::to_owned));
        assert_eq!(parser.last_event_id(), Some("3"));
        assert_eq!(
            parser.push(b": hello\n\nid: 4\ndata: {}\n\n"),
            vec![event("", "{}", Some("4"))]
        );
        // An event without id keeps the last one.
        assert_eq!(parser.push(b"data: x\n\n"), vec![event("", "x", Some("4"))]);
    }

    /// An id without data still moves the last event id (the standard's rule); an id with NUL is
    /// ignored, an empty one resets it; fields without a colon, unknown fields and `retry` are
    /// ignored; one space after the colon is dropped, not more; a leading byte order mark is dropped.
    #[test]
    fn follows_the_standards_field_rules() {
        let mut parser = SseParser::default();
        assert!(parser.push("\u{feff}id: 9\n\n".as_bytes()).is_empty());
        assert_eq!(parser.last_event_id(), Some("9"));
        assert!(parser.push(b"id: 1\x002\n\n").is_empty());
        assert_eq!(parser.last_event_id(), Some("9"));
        let events = parser.push(b"retry: 10\nfoo: bar\ndata\ndata:  two\nevent:x\n\n");
        assert_eq!(events, vec![event("x", "\n two", Some("9"))]);
        assert!(parser.push(b"id\n\n").is_empty());
        assert_eq!(parser.last_event_id(), None);
        assert_eq!(
            parser.push(b"data: \xff\n\n"),
            vec![event("", "\u{fffd}", None)],
            "invalid UTF-8 is replaced, not fatal"
        );
    }
}
