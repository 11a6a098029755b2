# cython: freethreading_compatible = True
"""The client's per-frame fast path: picows frames in, whole messages out.

Nearly every frame a subscriber receives is a whole, uncompressed message
while nothing else is going on (no fragmented message open, no closing
handshake): ``FramePath.on_ws_frame`` hands those straight to
``on_message`` in C, with the text checked as UTF-8 in place, and every
other frame to ``on_other_frame``, which ``wirehub.client_wire.ClientWire``
implements (fragments, compression, control frames, closing).

Publications go one step further once the client has set
``publications`` (channel -> subscription) and ``decode_publication``: a
text message that starts with ``publication_prefix`` is decoded from the
frame's memory and handed to its subscription's ``_take``, with no Python
frame of the client's in between (the rest of what a subscriber's core
spends per message: ``bench/client_receive.py``). A message that does not
decode, or whose channel has no subscription, takes ``on_message``; so do
compressed and fragmented ones, which ``on_message`` hands back through
``take_publication`` once whole.

Reference twin: ``wirehub._pure.client_frames``.
"""

import picows
from libc.string cimport memcmp
from picows.picows cimport WSFrame, WSListener, WSMsgType, WSTransport

from wirehub._ext.frame cimport Utf8Validator

# The Python enum members handed to on_message (converting the C enum on
# every call costs more than the rest of this function).
cdef object _TEXT = picows.WSMsgType.TEXT
cdef object _BINARY = picows.WSMsgType.BINARY


cdef class FramePath(WSListener):
    """The fast path; subclassed (through ``client_wire.listener_class``) by a
    ``ClientWire``, which sets ``plain`` and ``max_message_bytes``."""

    cdef public bint plain                    # no fragmented message open, not closing
    cdef public Py_ssize_t max_message_bytes
    # The publication path (module docstring): all None until the client sets them.
    cdef public dict publications
    cdef public object decode_publication
    cdef public bytes publication_prefix
    cdef Utf8Validator _utf8

    def __cinit__(self):
        self.plain = True
        self.max_message_bytes = 0
        self._utf8 = Utf8Validator()

    cpdef on_ws_frame(self, WSTransport transport, WSFrame frame):
        cdef WSMsgType opcode = frame.msg_type
        if ((opcode == WSMsgType.TEXT or opcode == WSMsgType.BINARY) and frame.fin and self.plain
                and not (frame.rsv1 or frame.rsv2 or frame.rsv3)
                and frame.payload_size <= self.max_message_bytes):
            if opcode == WSMsgType.TEXT:
                self._utf8.reset()
                if not (self._utf8.feed_ptr(<const unsigned char*>frame.payload_ptr, frame.payload_size)
                        and self._utf8.finish()):
                    self.fail(1007, "text message is not valid UTF-8")
                    return
                if self.publications is not None and self._take_frame(frame):
                    return
            self.on_message(_TEXT if opcode == WSMsgType.TEXT else _BINARY, frame.get_payload_as_bytes())
        else:
            self.on_other_frame(transport, frame)

    def take_publication(self, payload):
        """Hand a whole text message (a buffer) to its subscription if it is
        a publication; False: not one (or not decodable, or no subscription)."""
        prefix = self.publication_prefix
        return payload[:len(prefix)] == prefix and self._take_publication(payload)

    cdef bint _take_frame(self, WSFrame frame) except -1:
        """``take_publication`` for a frame: the prefix compared in its memory."""
        cdef bytes prefix = self.publication_prefix
        cdef Py_ssize_t size = len(prefix)
        if frame.payload_size < size or memcmp(frame.payload_ptr, <const char*>prefix, size) != 0:
            return False
        return self._take_publication(frame.get_payload_as_memoryview())

    cdef bint _take_publication(self, object payload) except -1:
        """Decode a message known to start like a publication; hand it over."""
        try:
            msg = self.decode_publication(payload)
        except ValueError:   # msgspec.DecodeError and ValidationError
            return False
        sub = self.publications.get(msg.channel)
        if sub is None:
            return False
        sub._take(msg)
        return True
