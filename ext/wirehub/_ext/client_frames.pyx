# cython: freethreading_compatible = True
"""The client's per-frame fast path: picows frames in, whole messages out.

Nearly every frame a subscriber receives is a whole, uncompressed message
while nothing else is going on (no fragmented message open, no closing
handshake): ``FramePath.on_ws_frame`` hands those straight to
``on_message`` in C, with the text checked as UTF-8 in place, and every
other frame to ``on_other_frame``, which ``wirehub.client_wire.ClientWire``
implements (fragments, compression, control frames, closing). Reference
twin: ``wirehub._pure.client_frames``.
"""

import picows
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
            self.on_message(_TEXT if opcode == WSMsgType.TEXT else _BINARY, frame.get_payload_as_bytes())
        else:
            self.on_other_frame(transport, frame)
