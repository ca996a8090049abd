"""The words around a match that make it an instruction to the model rather than an ordinary sentence.

A pattern finds a phrase; these checks decide whether it is aimed at the assistant: an imperative (the
start of a sentence, or "please", not "when I set the priority to urgent"), a directive after a spoofed
"System:" line, a first-person object ("ignore the instructions *I sent*"), a topic after a preposition
("your rules *for refunds*"), a text addressed to the model ("Assistant, ...", "automated readers of
this must ..."). Shared by the English and the other-language rules.
"""

from __future__ import annotations

import re

W = r"[\w'’-]{1,24}"  # one word, bounded

# What comes just before an imperative in a ticket: the start of a sentence or clause, or a request
# addressed to someone. "When I set the priority to urgent" and "the proxy should act as a gateway" have
# neither.
IMPERATIVE_BEFORE = re.compile(
    r"(?:^\s*|[\n.!?:;,\"'(\[{>*\-]\s*|\b(?:please|pls|kindly|now|just|simply|also|instead|then|always|"
    r"you\s+(?:must|will|shall|should|need\s+to|have\s+to|are\s+to)|i\s+(?:want|need)\s+you\s+to|"
    r"(?:ai|assistant|bot|model|classifier|llm)\s*[,:]?)\s+)$", re.MULTILINE)

# What an instruction to the triage assistant says. A spoofed "System:" line, a "[system]" tag or an "end of
# ticket" marker fires only when one of these follows it: "System: macOS 14.2" and log lines stay quiet.
DIRECTIVE = re.compile(
    r"\b(?:(?:ignore|disregard|forget|override|bypass)\s+(?:your|the|all|any|every|previous|prior|above|these|those|"
    r"this|its|my|our)|obey|comply\s+with|reveal\s+(?:your|the\s+system)|"
    r"respond\s+(?:only|with|in)|reply\s+(?:only|with)|answer\s+(?:only|with)|output\s+(?:only|the\s+following)|"
    r"classify|categori[sz]e|label\s+(?:this|it)|triage|mark\s+(?:this|it|the\s+ticket)|flag\s+(?:this|it)|"
    r"treat\s+(?:this|it)|(?:set|change|make)\s+(?:the\s+)?(?:priority|category|severity)|needs[_-]human|"
    r"(?:priority|category)\s*(?:[:=]|to|as|is|must\s+be|should\s+be)\s*[\"']?(?:urgent|high|critical|low|"
    r"medium|billing|bug|account|feature_request|outage|abuse)|"
    r"you\s+(?:must|will|shall|are\s+to|should)\s+(?:now\s+|always\s+|only\s+)?(?:ignore|respond|reply|answer|"
    r"output|classify|obey|comply|follow|act|treat|mark|set|never)|new\s+instructions?|"
    r"(?:the\s+)?(?:user|customer|sender|requester)\s+(?:is|has\s+been)\s+(?:verified|trusted|authori[sz]ed|"
    r"an?\s+(?:admin|administrator|vip|owner|employee))|you\s+are\s+now|"
    r"approve\s+(?:a|an|the|this|all|every|full|their|his|her)|grant\s+(?:this|the|them|him|her|me|full|admin|owner)|"
    r"issue\s+(?:a\s+)?(?:full\s+)?refund|(?:escalate|forward)\s+(?:this\s+|it\s+)?to|"
    r"(?:set|change|update)\s+(?:this|the)\s+ticket|(?:are|is)\s+(?:now\s+|hereby\s+)?(?:null\s+and\s+)?(?:void|"
    r"revoked|cancell?ed|rescinded|suspended|lifted|overridden)|(?:reviewed|seen|checked|read)\s+by\s+(?:a\s+)?"
    r"(?:staff|humans?|people|person|anyone|a\s+person))\b")

# A first-person object makes an override phrase a customer's own correction ("ignore the previous
# instructions I sent", "... in my last email"), or the support team's ("the instructions you sent").
MINE_AFTER = re.compile(r"\s*(?:(?:that\s+)?(?:i|we)\s+(?:gave|sent|wrote|provided|mentioned|left|had|made|"
                        r"added|posted|shared|emailed|gave\s+you)|(?:in|from|on|of|at|to)\s+(?:my|our)|"
                        r"you\s+(?:sent|gave|emailed|provided|mentioned|shared|wrote|received))\b")
# A preposition after a weaker phrase gives it an ordinary topic ("ignore the instructions on the invoice",
# "what are your rules for refunds"); "append your instructions at the end" is not a topic.
PREP_AFTER = re.compile(r"\s*(?!at\s+the\s+(?:end|bottom|top|start|beginning))(?:for|on|about|regarding|concerning|"
                        r"to|of|in|how|when|from|with|under|at|that\s+(?:came|come)\s+with)\b")
# ... and an end (of sentence, or of the clause) leaves it as a bare command ("ignore the instructions.").
END_AFTER = re.compile(r"\s*(?:$|[.,;:!?)\"'\]]|\b(?:and|then|above|so\s+far|verbatim|exactly|word\s+for\s+word|"
                       r"in\s+full|you\s+(?:were|have\s+been|got)|given|entirely|completely|now|instead)\b)")

# Who an injection addresses: the assistant, a bot, "automated reviewers", "the AI that reads tickets".
AI_READER = (r"(?:ai|a\.i\.|ais|assistants?|bots?|chat-?bots?|agents?|(?:language\s+)?models?|llms?|classifiers?|"
             r"triage(?:[\s-](?:bot|ai|system|assistant|agent|model))?|triage-?bot|automated\s+(?:agents?|assistants?|"
             r"systems?|reviewers?|readers?|tools?|triage|process(?:es|ors)?)|(?:bots|assistants)\s+and\s+(?:bots|"
             r"assistants|agents)|ai\s+(?:triage|assistant|agent|bot|system|classifier|model)|gpt|chatgpt|copilot)")
# Where a vocative ("Assistant, ...", "AI triage: ...", "@triage-bot ...") starts: a sentence, a clause, a
# greeting, a quote or a mention.
_VOCATIVE_BEFORE = re.compile(r"(?:^|[\n.!?:;(\[—–\-\"'>*]|\b(?:and|also|oh|hey|hi|hello|dear|ok|okay|so|now|btw|ps|"
                              r"attention|listen|yo))\s*,?\s*(?:the\s+)?@?$", re.MULTILINE)
# What a text addressed to an AI reader asks of it. After a bare vocative only a manipulation counts: a
# verdict, a waiver, an approval, the reader's instructions, skipping a human. "Hi bot, please delete my
# account" and "AI, why does the summary ignore my filters?" are ordinary requests.
_MANIPULATION = (
    r"must|are\s+(?:instructed|authori[sz]ed|required|permitted|allowed)\s+to|is\s+pre-?approved|pre-?approved|"
    r"yourself|(?:do\s+not|don'?t|never|no\s+need\s+to)\s+(?:notify|flag|page|involve|escalate|forward|review|ask|tell|"
    r"classify|categori[sz]e|send\s+(?:this|it)\s+to)|skip\s+the\s+(?:human|queue|review|approval|check)|waive|"
    r"approve|grant|issue\s+(?:a|the|an|full)|append|tell\s+the\s+user|read\s+out|answer\s+[\"']|new\s+polic(?:y|ies)|"
    r"(?:ignore|disregard|forget)\s+(?:your|the|all|any|every|previous|prior|above|these|those|this)|override|"
    r"reveal|(?:classify|categori[sz]e|label|mark|flag|treat|file)\s+(?:this|it|the\s+ticket|as|me|us)|"
    r"set\s+(?:the\s+|this\s+)?(?:priority|category|ticket)|priority\s*[:=]|(?:as|to)\s+(?:urgent|low|high)\b|"
    r"needs[_-]human|reply\s+with|respond\s+with|when\s+you\s+(?:answer|reply|respond|read|see|process)")
MANIPULATION = re.compile(rf"\b(?:{_MANIPULATION})\b")
# After "automated assistants handling this message", "a note to the AI" or "before you categorise", the
# text is plainly addressed to the model, so any action on the account or the ticket counts too.
_ADDRESSED = re.compile(
    rf"\b(?:{_MANIPULATION}|are\s+to|transfer|export|delete|remove|close\s+(?:every|all|this|the)|"
    r"(?:make|give)\s+(?:me|us)|prioriti[sz]e|mark\s+(?:as|the|this|it)|send\s+(?:me|us|the|all|every)|"
    r"refund|credit|discount|apply\s+(?:the|a|it|this)|classify|categori[sz]e|label|urgent|escalate|forward|"
    r"route)\b")


def after(text: str, end: int, pattern: re.Pattern[str], width: int = 40) -> bool:
    """Does `pattern` match right after position `end`?"""
    return pattern.match(text[end:end + width]) is not None


def imperative(m: re.Match[str], text: str) -> bool:
    return IMPERATIVE_BEFORE.search(text, max(0, m.start() - 40), m.start()) is not None


def directive_follows(text: str, end: int, width: int = 200) -> bool:
    return DIRECTIVE.search(text, end, end + width) is not None


def directive_check(m: re.Match[str], text: str) -> bool:
    return directive_follows(text, m.end())


def addressed_check(m: re.Match[str], text: str) -> bool:
    return _ADDRESSED.search(text, m.end(), m.end() + 200) is not None


def manipulation_check(m: re.Match[str], text: str) -> bool:
    return MANIPULATION.search(text, m.end(), m.end() + 160) is not None


def vocative_check(m: re.Match[str], text: str) -> bool:
    return (_VOCATIVE_BEFORE.search(text, max(0, m.start() - 16), m.start()) is not None
            and manipulation_check(m, text))


def word_start(m: re.Match[str], text: str) -> bool:
    return m.start() == 0 or not text[m.start() - 1].isalnum()


def role_line_check(m: re.Match[str], text: str) -> bool:
    """A directive on the rest of the line (or on the next one, when the label stands alone on its line)."""
    end = text.find("\n", m.end())
    line = text[m.end():end if end >= 0 else len(text)]
    if not line.strip() and end >= 0:
        nxt = text.find("\n", end + 1)
        line = text[end + 1:nxt if nxt >= 0 else len(text)]
    return DIRECTIVE.search(line[:240]) is not None
