"""A restart that keeps the room: the state blob (:mod:`.state`) and how the old process
hands its socket and that blob to the new one (:mod:`.transfer`, :mod:`.takeover`)."""
