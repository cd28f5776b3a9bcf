"""Every sentence the bot says to a user, in one place.

Commands are written in the console's syntax (``/draw PROMPT``); chat platforms use the same names.
Every text about something that went wrong says what to do next.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from bot.settings import BotSettings
from engine.api import ErrorCode, Refusal

# --- consent and help -----------------------------------------------------------------------------

CONSENT = """\
Welcome to AvatarBooth. Send 3 to 5 selfies and I will build a private image model of you.

Before anything is stored, please read what that means. Faces are biometric data.
If you agree, I store:
  - the photos you send me;
  - face embeddings: numbers that describe your face, computed from each photo;
  - the personal model trained on your photos;
  - the images you ask me to draw.
Why: to check your photos, to train your model and to draw you. Nothing is shared or used for
anything else.
/forget erases all of it at any time: photos, embeddings, models, images and job records.
Nothing about you is stored before you send /agree."""

CONSENT_RECORDED = (
    "Thank you, your consent is recorded. Send {min_photos} to {max_photos} selfies with /photo: "
    "one face per photo, well lit and in focus, different angles welcome."
)
ALREADY_CONSENTED = "You have already agreed. Send selfies with /photo, or see /help."

HELP = """\
Commands:
  /start                         what is stored and why; how to agree
  /agree                         give your consent (nothing is stored before this)
  /photo PATH...                 send 3 to 5 selfies (quote paths with spaces)
  /photos                        your photos and whether each was accepted
  /preview [--style S] [--ar W:H] [--fast] [PROMPT]
                                 an instant picture of you, before any training
  /train [lora|ti|dreambooth] [woman|man|person]
                                 train your personal model (lora is the default; "me" in
                                 your prompts becomes that word, by your photos unless named)
  /draw [--style S] [--ar W:H] [--boost] [--fast] PROMPT
                                 draw a picture, e.g. /draw --ar 3:4 me as an astronaut
  /styles                        the style presets for --style
  /pack [NAME]                   a pack of avatars in several styles from your model
                                 (/pack alone lists the packs)
  /upscale [N]                   image N (1 by default) of the last result at twice its size
  /status                        your photos, models and running jobs
  /forget                        erase everything stored about you
  /help                          this list
Options: --ar picks the shape (1:1, 3:4, 4:3, 2:3, 3:2, 9:16, 16:9; square by default);
  --boost adds your enrolled face to a LoRA model's drawing for a closer likeness;
  --fast draws faster, with a little less detail."""

UNKNOWN_COMMAND = "I don't know {command!r}. Send /help for the list of commands."
NOT_A_COMMAND = "Commands start with '/'. Send /help for the list of commands."

# --- errors (BotError messages) -------------------------------------------------------------------

CONSENT_REQUIRED = "I can't store anything before you agree. Read /start, then send /agree."
NOT_ENOUGH_PHOTOS = (
    "You have {have} accepted photo(s); {need} are needed. Send {missing} more with /photo."
)
TOO_MANY_PHOTOS = (
    "You already have {max_photos} photos, the most I keep. "
    "To start over with other photos, use /forget and then /agree again."
)
TRAINING_ALREADY_RUNNING = (
    "Your model is already training. Wait for it to finish (see /status) before starting another."
)
NO_MODEL_YET = "You have no personal model yet. Use /train to make one."
PACK_NEEDS_MODEL = (
    "A pack is drawn from your own model, and you have none yet. Use /train lora to make one "
    "(it takes a while), then send /pack again."
)
UNKNOWN_PACK = "There is no pack called {name!r}. Choose one of: {names} (/pack lists them)."
UNKNOWN_METHOD = "I don't know the training method {method!r}. Choose one of: {choices}."
UNKNOWN_CLASS_WORD = (
    "I can't train you as {word!r}. Choose one of: {choices}, e.g. /train lora {example}; "
    "or leave it out and your photos decide."
)
METHOD_NOT_ENABLED = (
    "{method!r} is a valid method, but this bot's operator has not enabled it (enabled: {enabled}). "
    "Send /train {default} instead."
)
PROMPT_BLOCKED = (
    "I can't draw that: {term!r} is not allowed on this bot. Rephrase your prompt without it."
)
UNKNOWN_ASPECT = "There is no aspect ratio {aspect!r}. Choose one of: {choices} (width:height)."
UNKNOWN_OPTION = (
    "I don't know the option {option!r} here. /preview takes --style S, --ar W:H and --fast; "
    "/draw also takes --boost. Options go before the prompt."
)
MISSING_OPTION_VALUE = "The option {option} needs a value, e.g. {example}."
REPEATED_OPTION = "You gave {option} twice. Give it once, with the value you want, and send it again."
SOMETHING_BROKE = (
    "Something went wrong on my side. Try again in a minute; if it keeps happening, "
    "tell the bot's operator."
)
UNKNOWN_STYLE = "There is no style called {style!r}. Choose one of: {names} (see /styles)."


def styles_list(styles: list[tuple[str, str]]) -> str:
    """The style presets, as /styles shows them."""
    lines = ["Styles for /preview and /draw (e.g. /draw --style anime me as an astronaut):"]
    lines += [f"  {name}: {title}" for name, title in styles]
    return "\n".join(lines)


EMPTY_PROMPT = "Tell me what to draw, e.g. /draw me as an astronaut."
PROMPT_TOO_LONG = (
    "Your prompt has {length} characters; the limit is {limit}. Shorten it and send it again."
)
RATE_LIMITED = "You have reached the limit of {limit} images per hour. Try again in {wait}."
QUEUE_UNAVAILABLE = (
    "The image service can't be reached right now. Try again in a minute; /status shows what was kept."
)
JOB_TIMED_OUT = (
    "The {what} took longer than {seconds} s and I stopped waiting. "
    "Try again later; /status shows what is still running."
)
JOB_LOST = (
    "The {what} was lost by the job queue (perhaps it restarted). Send the command again."
)
JOB_BROKEN_RESULT = (
    "The {what} came back in a form I can't read. Try again; if it keeps happening, "
    "tell the bot's operator."
)

_ERROR_CODES: dict[ErrorCode, str] = {
    ErrorCode.MISSING_BLOB: (
        "a file it needed was missing. If you used /forget meanwhile, start again with /agree; "
        "otherwise send the photo again."
    ),
    ErrorCode.INVALID_REQUEST: (
        "it could not work with this request. Check the command with /help and try again."
    ),
    ErrorCode.MODEL_UNAVAILABLE: (
        "the image model is not available right now. Try again in a few minutes."
    ),
    ErrorCode.PREVIEW_UNAVAILABLE: (
        "this bot runs an SD1.5 model, and instant previews (InstantID) exist for SDXL only. "
        "Train your personal model with /train, then /draw."
    ),
    ErrorCode.NOT_ENOUGH_GPU_MEMORY: (
        "the image server's GPU has too little memory for this kind of model. Try /train lora; "
        "the bot's operator can find the setting to change in the worker's log."
    ),
    ErrorCode.ERASED: (
        "you used /forget meanwhile, so nothing it made was kept. Send /start to begin again."
    ),
    ErrorCode.INTERNAL: (
        "something broke on the image server. Try again; if it keeps happening, "
        "tell the bot's operator."
    ),
}


_JOB_LABELS = {
    "check_photo": "photo check",
    "preview": "preview",
    "train": "training",
    "draw": "drawing",
}


def job_label(kind: str) -> str:
    """What a job kind is called in messages: 'train' -> 'training'."""
    return _JOB_LABELS.get(kind, kind.replace("_", " "))


def job_failed(what: str, code: str) -> str:
    """Why a worker job failed, from its `ErrorCode`, and what to do next."""
    try:
        reason = _ERROR_CODES[ErrorCode(code)]
    except (ValueError, KeyError):
        reason = _ERROR_CODES[ErrorCode.INTERNAL]
    return f"The {what} failed: {reason}"


def job_timed_out(what: str, seconds: float) -> str:
    return JOB_TIMED_OUT.format(what=what, seconds=round(seconds))


def duration(seconds: float) -> str:
    """A short human duration: '45 s', '12 min', '1 h 5 min'."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes = (seconds + 59) // 60
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min"


# --- photos ----------------------------------------------------------------------------------------

_REFUSALS: dict[Refusal, str] = {
    Refusal.NOT_AN_IMAGE: "not a photo I can read: send a JPEG, PNG or WebP image.",
    Refusal.TRUNCATED: "the file is cut off or damaged: send it again, or export it anew.",
    Refusal.TOO_MANY_PIXELS: (
        "the image has too many pixels: send a smaller version (under {max_megapixels} megapixels)."
    ),
    Refusal.TOO_FEW_PIXELS: (
        "the image is too small: send one at least {min_side} pixels on its shorter side."
    ),
    Refusal.FILE_TOO_LARGE: "the file is too large: send one under {max_mib} MiB.",
    Refusal.DUPLICATE: "you already sent this photo (or a copy of it): send a different one.",
    Refusal.NO_FACE: "I found no face: send a photo where your face is clearly visible.",
    Refusal.SEVERAL_FACES: (
        "I found more than one face: send a photo with only you in it, or crop the others out."
    ),
    Refusal.FACE_TOO_SMALL: (
        "your face is too small in the picture: send a closer photo where it fills more of the frame, "
        "or one taken at a higher resolution."
    ),
    Refusal.TOO_BLURRY: "too blurry: send a sharper photo, in good light, face in focus.",
    Refusal.DIFFERENT_PERSON: (
        "this looks like a different person from your other photos: send photos of yourself only."
    ),
}


_FACE_TOO_SMALL_MEASURED = (
    "your face is {face_px} pixels across in the picture, and training needs at least {needed_px}: "
    "send a closer photo where it fills more of the frame, or one taken at a higher resolution."
)


def refusal(
    code: str, settings: BotSettings, *, face_px: int | None = None, needed_face_px: int | None = None
) -> str:
    """One sentence for a `Refusal` code: what is wrong and what to send instead.

    A face too small says its size and the size needed when the photo check measured them.
    """
    if code == Refusal.FACE_TOO_SMALL and face_px is not None and needed_face_px is not None:
        return _FACE_TOO_SMALL_MEASURED.format(face_px=face_px, needed_px=needed_face_px)
    try:
        template = _REFUSALS[Refusal(code)]
    except ValueError:
        return f"refused ({code}): send a different photo."
    return template.format(
        max_megapixels=settings.max_pixels // 1_000_000,
        min_side=settings.min_side,
        max_mib=settings.max_upload_bytes // (1024 * 1024),
    )


BUTTON_LABELS = {
    "agree": "I agree",
    "reroll": "Draw again",
    "more": "More like this",
    "full": "Full size",
    "upscale": "2× upscale",
    "delete": "Delete",
}
"""Every platform's label for each button, by `bot.chat.actions.Verb`."""


def photo_label(index: int, filename: str | None) -> str:
    return f"photo {index} ({filename})" if filename else f"photo {index}"


def photo_accepted(label: str) -> str:
    return f"{label}: accepted."


def photo_refused(label: str, reason: str) -> str:
    return f"{label}: {refused(reason)}"


def refused(reason: str) -> str:
    """Why a photo was refused, after its label."""
    return f"refused, {reason}"


def photo_unreceived(label: str, why: str) -> str:
    """A file the platform could not give the bot (see `bot.replies.Unreceived`)."""
    return f"{label}: {why}"


def photo_failed(label: str, message: str) -> str:
    return f"{label}: not kept. {message}"


def photo_over_limit(label: str, max_photos: int) -> str:
    return f"{label}: not kept, you already have {max_photos} photos (the most I keep)."


def enrollment_standing(accepted: int, min_photos: int, max_photos: int) -> str:
    """Where the user stands after sending photos."""
    if accepted >= max_photos:
        return f"{accepted} of {max_photos} photos: you can /preview and /train now."
    if accepted >= min_photos:
        # "4 of 3 photos" read like a mistake: past the minimum, just the count.
        count = f"{accepted} of {min_photos} photos" if accepted == min_photos else f"{accepted} photos"
        return (
            f"{count}: you can /preview and /train now "
            f"(up to {max_photos} photos improve the result)."
        )
    missing = min_photos - accepted
    return f"{accepted} of {min_photos} photos: send {missing} more with /photo."


NO_PHOTOS = "You have no photos yet. Send {min_photos} to {max_photos} selfies with /photo."


def photo_list_line(index: int, status: str, reason: str | None) -> str:
    if status == "accepted":
        return f"  {index}. accepted"
    if status == "refused":
        return f"  {index}. refused: {reason or 'no reason given'}"
    return f"  {index}. still being checked"


# --- progress, results ------------------------------------------------------------------------------

def progress(what: str, fields: Mapping[str, str]) -> str:
    """A progress line from a worker's progress hash, e.g.
    'training: step 12/40, loss 0.123, about 8 s left'."""
    stage = fields.get("stage") or what
    parts: list[str] = []
    step, total = fields.get("step"), fields.get("total")
    if step and total:
        parts.append(f"step {step}/{total}")
    elif step:
        parts.append(f"step {step}")
    if fields.get("loss"):
        parts.append(f"loss {fields['loss']}")
    eta = _as_float(fields.get("eta_s"))
    if eta is not None and eta > 0:
        parts.append(f"about {duration(eta)} left")
    return f"{stage}: {', '.join(parts)}" if parts else f"{stage}..."


def _as_float(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


TINY_NOTE = (
    "Note: this bot runs the 'tiny' test preset; its images are random noise, not pictures of you."
)
PREVIEW_DONE = "Here is your instant preview (InstantID, no training yet). /train makes a personal model."
TRAINING_STARTED = "Training your {method} model on {count} photos. This can take a while."
TRAINING_DONE = (
    "Your {method} model v{version} is ready. Try /draw me as an astronaut."
)
DRAWN_BY_MODEL = "Drawn by your {method} model v{version}."
DRAWN_BY_INSTANTID = (
    "Drawn with the instant preview model (InstantID): you have no personal model yet, /train makes one."
)


UPSCALING = "upscaling"
"""The progress label of an upscale (its steps are those of every tile together)."""


def upscaled(width: int, height: int, upscales: int) -> str:
    """The first line of an upscale's reply; ``upscales``: how many times the image was enlarged."""
    factor = 2**upscales
    return (
        f"Here it is at {factor}× its drawn size, {width}×{height} pixels, sent as a file so that "
        "nothing recompresses it."
    )


UPSCALE_LIMIT = (
    "This image is already {factor}× its drawn size, the largest I make. Save it as it is, or press "
    "2× upscale under one of your smaller images."
)


def packs_list(packs: list[tuple[str, str, int, str]]) -> str:
    """/pack without a name: (name, title, count, description) of each pack."""
    lines = ["Packs (send /pack NAME, e.g. /pack " + packs[0][0] + "):"]
    lines += [f"  {name}: {title}, {count} images. {description}".rstrip() for name, title, count, description in packs]
    return "\n".join(lines)


def pack_progress(title: str, done: int, count: int, line: str | None = None) -> str:
    head = f"Pack {title}: {done} of {count} images done"
    return f"{head}; image {done + 1}: {line}" if line else head + "."


PACK_DONE = "Your pack {title}: {count} images from your {method} model v{version}, each the best of {best_of}."
PACK_IMAGE_LOST = "It was deleted or could not be finished; send /pack again for a new set."
PACK_RESUMED_NOTE = "({done} of them were made before the restart and were not made again.)"


def pack_image_line(
    index: int, subject: str, score: float | None, detail: tuple[float, float] | None = None
) -> str:
    likeness = "no face found to compare" if score is None else f"likeness {score:.2f}"
    return f"image {index} ({subject}): {likeness}{_detail_note(detail)}"


def pack_image_failed(index: int, subject: str, message: str) -> str:
    return f"image {index} ({subject}): not made. {message}"


def image_line(index: int, score: float | None, detail: tuple[float, float] | None = None) -> str:
    if score is None:
        return f"image {index}: no face found to compare"
    return f"image {index}: face similarity {score:.2f}{_detail_note(detail)}"


def _detail_note(detail: tuple[float, float] | None) -> str:
    """What the face-detail pass did, e.g. ' (face detail: 0.52 -> 0.61, kept)'."""
    if detail is None:
        return ""
    drawn, detailed = detail
    verdict = "kept" if detailed > drawn else "not kept, the drawing looked more like you"
    return f" (face detail: {drawn:.2f} -> {detailed:.2f}, {verdict})"


# --- status, forget ---------------------------------------------------------------------------------

def status_photos(accepted: int, pending: int, refused: int, min_photos: int) -> str:
    line = f"Photos: {accepted} accepted"
    if pending:
        line += f", {pending} being checked"
    if refused:
        line += f", {refused} refused"
    if accepted < min_photos:
        line += f" ({min_photos - accepted} more needed)"
    return line + "."


def status_models(models: Sequence[tuple[int, str, str]]) -> str:
    """`models`: (version, method, base preset), newest last."""
    if not models:
        return "Models: none yet (/train makes one)."
    listed = ", ".join(f"v{v} {method} on {base}" for v, method, base in models)
    return f"Models: {listed}."


def status_jobs(jobs: Sequence[tuple[str, str, float | None]]) -> str:
    """`jobs`: (kind, state, progress 0..1 or None)."""
    if not jobs:
        return "Jobs: nothing running."
    parts = []
    for kind, state, fraction in jobs:
        part = f"{kind} {state}"
        if fraction is not None:
            part += f" {round(fraction * 100)}%"
        parts.append(part)
    return "Jobs: " + ", ".join(parts) + "."


STATUS_NOT_CONSENTED = "You have not agreed yet, so nothing about you is stored. Read /start."
FORGOTTEN = (
    "Done: I erased your photos, face embeddings, models, images and job records "
    "({blobs} files). Send /start to begin again."
)
CONSOLE_STORAGE_FAILED = (
    "I could not read or write the data folder: {reason}. Check its free space and permissions, "
    "then send the command again."
)
CONSOLE_FORGOTTEN_FILES = "I also deleted the {count} images I had saved in {folder}."
FORGOTTEN_NOTHING = "There was nothing stored about you. Send /start to begin."
FORGET_PENDING = (
    "I erased your photos, models, images and job records from the database, but some files or "
    "queue entries could not be removed yet (a job still stopping, or a storage problem). I keep "
    "trying until they are gone, without anything else from you; /status says when it is finished."
)
RESULT_NOT_SAVED = (
    "The {what} finished, but I could not save its result (the bot's storage failed). "
    "Send the command again in a minute; if it keeps happening, tell the bot's operator."
)
ERASED_MEANWHILE = "You used /forget while this was running, so its result was discarded."
RESUMED = "Finished work that was interrupted by a restart:"

# --- console ---------------------------------------------------------------------------------------

FILE_MISSING = "not sent, there is no such file: {path}. Check the path and send it again."
FILE_UNREADABLE = "not sent, I can't read {path} ({reason}). Give the path of an image file."
NO_FILES = "Give one or more file paths: /photo PATH... (quote paths with spaces)."
BAD_QUOTING = "I couldn't read that line ({reason}); check the quotes and send it again."
IMAGE_SAVED = "saved {path}"
CONSOLE_NOTHING_TO_UPSCALE = (
    "There is no image to upscale yet in this session: make one with /draw or /preview, then send /upscale."
)
CONSOLE_NO_SUCH_IMAGE = (
    "The last result has {count} image(s), so there is no image {number}. Send /upscale with a number "
    "from 1 to {count}."
)
def images_withheld(count: int) -> str:
    """Images the NSFW check replaced: say so, and what to do instead."""
    what = "1 image was" if count == 1 else f"{count} images were"
    return f"{what} withheld by the safety filter. Try a different prompt, or /draw again."


IMAGE_DELETED = "Deleted that image. Your other images and your model are untouched."
NOT_YOUR_IMAGE = (
    "That image is not yours, or it was deleted: buttons work only for the person who asked for "
    "the image. Use /draw to make your own."
)

# --- Telegram --------------------------------------------------------------------------------------
# Only what Telegram needs beyond the texts above (its users send photos, not file paths).

TELEGRAM_HELP = """\
Commands:
  /start                         what is stored and why; a button to agree
  /photos                        your photos and whether each was accepted
  /preview [--style S] [--fast] [PROMPT]
                                 an instant picture of you, before any training
  /train [lora|ti|dreambooth] [woman|man|person]
                                 train your personal model (lora is the default; "me" in
                                 your prompts becomes that word, by your photos unless named)
  /draw [--style S] [--fast] PROMPT
                                 draw a picture, e.g. /draw me as an astronaut
  /styles                        the style presets for --style
  /status                        your photos, models and running jobs
  /forget                        erase everything stored about you
  /help                          this list
--fast draws faster, with a little less detail.
Selfies: send 3 to 5 right here, as photos or as files (files keep full quality); an album is fine.
Under each picture: Draw again, More like this, 2× upscale (sent as a file), Full size, Delete."""
TELEGRAM_COMMANDS = (
    ("start", "what is stored and why; agree"),
    ("photos", "your photos and whether each was accepted"),
    ("preview", "an instant picture of you"),
    ("train", "train your personal model"),
    ("draw", "draw a picture, e.g. /draw me as an astronaut"),
    ("styles", "the style presets for /draw --style"),
    ("pack", "a pack of avatars from your model; /pack lists them"),
    ("status", "your photos, models and running jobs"),
    ("forget", "erase everything stored about you"),
    ("help", "all commands"),
)
TELEGRAM_SEND_PHOTOS = (
    "Send your selfies right here, as photos or as files (files keep full quality); "
    "several at once is fine."
)
TELEGRAM_NOT_AN_UPLOAD = (
    "I can only use photos and image files. Send your selfies as photos or files, or see /help."
)
TELEGRAM_FILE_TOO_BIG = (
    "not kept, Telegram lets bots fetch files only up to {limit_mb} MB. "
    "Send it as a photo (Telegram makes it smaller) or export a smaller file."
)
TELEGRAM_DOWNLOAD_FAILED = (
    "not kept, I couldn't fetch it from Telegram. Send it again in a minute."
)
TELEGRAM_PROGRESS_DONE = "{what}: done."
TELEGRAM_PRIVATE_ONLY = (
    "I work in private chats only, so nobody else sees your photos or your model. "
    "Open a chat with me (tap my name, then Start) and send the command there."
)
TELEGRAM_ANSWERED_PRIVATELY = (
    "I answered you in our private chat, so nobody else here sees your photos or your model."
)
TELEGRAM_NOT_ALLOWED = "This bot is not open to this chat. Ask the bot's operator for access."
TELEGRAM_NOT_YOUR_BUTTON = "This button belongs to someone else. Send /start to use the bot yourself."
TELEGRAM_UNKNOWN_BUTTON = (
    "This button no longer works. Send the command again, e.g. /draw me as an astronaut."
)

# --- Discord ---------------------------------------------------------------------------------------
# Only what Discord needs beyond the texts above (slash commands with attachment options, buttons).

DISCORD_HELP = """\
Commands:
  /start                         what is stored and why; a button to agree
  /agree                         give your consent (nothing is stored before this)
  /enroll photo1 .. photo5       attach 3 to 5 selfies (or send them to me by DM)
  /photos                        your photos and whether each was accepted
  /preview [prompt] [style] [aspect] [fast]
                                 an instant picture of you, before any training
  /train [method] [subject]      train your personal model (lora is the default; subject:
                                 woman, man or person, by your photos unless named)
  /draw prompt [style] [aspect] [boost] [fast]
                                 draw a picture, e.g. /draw me as an astronaut
  /pack [name]                   a pack of avatars in several styles from your model
  /status                        your photos, models and running jobs
  /forget                        erase everything stored about you
  /help                          this list
style: a look from a menu (anime, oil painting, ...); aspect: the shape (3:4, 16:9, ...);
boost: adds your enrolled face to your model's drawing for a closer likeness;
fast: draws faster, with a little less detail.
Under each picture: Draw again, More like this, 2× upscale, Delete (only for you)."""
DISCORD_COMMANDS = {
    "start": "What is stored and why; agree to it",
    "agree": "Give your consent (nothing is stored before this)",
    "enroll": "Send 3 to 5 selfies as attachments",
    "photo": "Send 3 to 5 selfies as attachments (same as /enroll)",
    "photos": "Your photos and whether each was accepted",
    "preview": "An instant picture of you, before any training",
    "train": "Train your personal model",
    "draw": "Draw a picture of you, e.g. me as an astronaut",
    "pack": "A pack of avatars in several styles from your own model",
    "status": "Your photos, models and running jobs",
    "forget": "Erase everything stored about you",
    "help": "All commands",
}
DISCORD_PACK_OPTION = "Which pack"
DISCORD_PHOTO_OPTION = "Selfie {n}: one face, well lit and in focus"
DISCORD_PREVIEW_PROMPT_OPTION = "What to picture (optional), e.g. me as an astronaut"
DISCORD_TRAIN_METHOD_OPTION = "Training method (lora is the default)"
DISCORD_TRAIN_SUBJECT_OPTION = "What \"me\" in your prompts is: woman, man or person (default: by your photos)"
DISCORD_DRAW_PROMPT_OPTION = "What to draw, e.g. me as an astronaut"
DISCORD_STYLE_OPTION = "A style preset (see /help); none keeps your prompt as it is"
DISCORD_ASPECT_OPTION = "The picture's shape, width:height (square by default)"
DISCORD_BOOST_OPTION = "Add your enrolled face to your model's drawing for a closer likeness"
DISCORD_FAST_OPTION = "Draw faster, with a little less detail"
DISCORD_CONSENT_BUTTON_HINT = "Press \u201cI agree\u201d below (or send /agree) to continue."
DISCORD_NOT_YOUR_CONSENT = (
    "This button belongs to someone else's /start. Send /start to read the consent text yourself."
)
DISCORD_HANDOFF = (
    "This is taking a while: I will post the result as a new message and mention you."
)
DISCORD_CHECKING_UPLOADS = "Checking {count} photo(s)..."
DISCORD_DOWNLOAD_FAILED = (
    "not kept, I couldn't download it from Discord. Send it again in a minute."
)
DISCORD_DM_HINT = (
    "Send me your selfies right here as attachments, or use the slash commands: /help lists them."
)
DISCORD_DM_UPLOADS_OFF = (
    "Photos sent by direct message are turned off on this bot. Attach them to /enroll instead."
)
DISCORD_COMMAND_OUTDATED = (
    "This command is out of date (the bot was updated). Wait a minute for Discord to refresh "
    "its command list, then try again."
)
DISCORD_BAD_OPTION = "I couldn't read one of the command's options. Check them with /help and try again."
DISCORD_INTERRUPTED = (
    "I was stopped (probably restarted) while working on this. Send the command again in a minute; "
    "/status shows what was kept."
)
