"""Error replies from a site: a catalogue code and its fixed public text, details in the site's log.

Kept free of torch and MONAI so that the light protocol stages of secure aggregation start fast
(every message starts a fresh ClientApp process on a SuperNode).
"""

from __future__ import annotations

import logging

from flwr.app import Error, Message

from fedhealth.errors import SITE_ERROR_CODES, site_error_code

log = logging.getLogger("fedhealth.site")


def error_reply(msg: Message, exc: Exception, phase: str, name: str) -> Message:
    """Log ``exc`` in full at the site and reply with its catalogue code and public text only.

    Parameters
    ----------
    msg : Message
        The instruction that failed.
    exc : Exception
        What went wrong (its text stays in the site's log).
    phase : str
        ``train``, ``evaluate`` or a secure-aggregation stage, for the log.
    name : str
        The site's name; the reply's reason starts ``site <name>: ``.

    Returns
    -------
    Message
        An error reply to ``msg``: code from :func:`fedhealth.errors.site_error_code`, reason
        the code's fixed text from :data:`fedhealth.errors.SITE_ERROR_CODES`.
    """
    code = site_error_code(exc)
    log.exception("%s failed (error %d): %s", phase, code, exc)
    return Message(Error(code=code, reason=f"site {name}: {SITE_ERROR_CODES[code]}"), reply_to=msg)
