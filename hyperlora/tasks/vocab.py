"""The generator's vocabulary: topics, record attributes, numeric fields, answer words, format rules.

Each part carries a ``seen`` flag: parts marked unseen appear only in the held-out splits, never in
training policies (held-out topics, held-out answer words, held-out numeric fields and format rules).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topic:
    """A subject a record can be about: noun phrases for policies, a verb phrase, record sentences."""

    name: str
    nouns: tuple[str, ...]      # "refunds", "money back" -> "about {noun}"
    verb: str                   # third person singular: "asks for a refund"
    sentences: tuple[str, ...]  # what a customer writes (one short clause each)
    seen: bool = True


def _t(name: str, nouns: str, verb: str, *sentences: str, seen: bool = True) -> Topic:
    return Topic(name, tuple(n.strip() for n in nouns.split("|")), verb, tuple(sentences), seen)


TOPICS: tuple[Topic, ...] = (
    _t("refund", "refunds|getting money back", "asks for a refund",
       "I want my money back for order 4411.", "Please refund the blender I returned.",
       "Can I get a refund on my last purchase?", "Still waiting on the refund you promised."),
    _t("password", "password resets|forgotten passwords", "asks to reset a password",
       "I forgot my password and can't sign in.", "Please reset the password on my account.",
       "The password reset link never arrives.", "How do I change my password?"),
    _t("shipping_delay", "late deliveries|shipping delays", "complains about a late delivery",
       "My package is a week late.", "The order still hasn't shipped after ten days.",
       "Tracking has said 'in transit' since Monday.", "Where is my delivery? It was due Friday."),
    _t("cancel", "cancellations|ending a subscription", "wants to cancel a subscription",
       "Please cancel my subscription today.", "I'd like to stop my monthly plan.",
       "How do I end my membership?", "Cancel the auto-renewal on my account."),
    _t("address", "address changes|a new shipping address", "asks to change an address",
       "I moved, please update my address.", "Ship my order to my new flat instead.",
       "Can you change the delivery address on order 882?", "My billing address is out of date."),
    _t("damaged", "damaged items|broken goods", "reports a damaged item",
       "The mug arrived cracked.", "The screen was broken when I opened the box.",
       "Half the plates came smashed.", "My chair arrived with a snapped leg."),
    _t("wrong_item", "wrong items|mixed-up orders", "reports receiving the wrong item",
       "You sent me a blue shirt, I ordered red.", "This isn't the product I bought.",
       "I got someone else's order.", "The box had size 8 shoes, not size 10."),
    _t("double_charge", "double charges|duplicate payments", "reports being charged twice",
       "I was billed twice for the same order.", "There are two identical charges on my card.",
       "Your system took my payment two times.", "Duplicate charge of my subscription this month."),
    _t("account_locked", "locked accounts|account lockouts", "says their account is locked",
       "My account got locked after three tries.", "It says my account is suspended.",
       "I'm locked out of my profile.", "Why was my account frozen?"),
    _t("two_factor", "two-factor codes|login verification codes", "has trouble with a verification code",
       "The 2FA code never reaches my phone.", "My authenticator app codes are rejected.",
       "I lost the phone I use for login codes.", "The SMS verification code expired instantly."),
    _t("data_deletion", "data deletion|erasing personal data", "asks to delete their personal data",
       "Please erase all my personal data.", "Under GDPR I want my data deleted.",
       "Remove every record you hold about me.", "Delete my details from your systems."),
    _t("upgrade", "plan upgrades|moving to a bigger plan", "wants to upgrade a plan",
       "I'd like to move to the Pro plan.", "How do I upgrade to the business tier?",
       "We need the larger plan for our team.", "Can I switch to premium today?"),
    _t("discount", "discounts|coupon codes", "asks for a discount",
       "Is there a discount for students?", "My coupon code isn't working.",
       "Can you give me a better price?", "Do you have any promo codes this week?"),
    _t("api_error", "API errors|integration failures", "reports an API error",
       "Your API returns error 500 on every call.", "The webhook stopped firing yesterday.",
       "Our integration gets timeouts from your endpoint.", "API keys are rejected with 401."),
    _t("outage", "outages|the service being down", "reports that the service is down",
       "Your website is down for me.", "The app won't load at all.",
       "Nothing works since this morning.", "Is there an outage? The dashboard is blank."),
    _t("slow", "slow performance|a sluggish app", "complains that the product is slow",
       "The app is painfully slow today.", "Pages take a minute to load.",
       "Search has become really sluggish.", "Everything lags since the update."),
    _t("invoice_copy", "invoice copies|receipts", "asks for an invoice or receipt",
       "Can you send me a copy of my invoice?", "I need a receipt for my March payment.",
       "Please email the VAT invoice.", "Where can I download past invoices?"),
    _t("payment_method", "payment methods|card updates", "wants to update a payment method",
       "I need to change the card on file.", "My credit card expired, how do I update it?",
       "Can I pay by bank transfer instead?", "Please switch my payment to PayPal."),
    _t("phishing", "phishing|suspicious emails", "reports a suspicious email",
       "I got an email asking for my password, is it you?", "Someone sent me a fake invoice link.",
       "This message claiming to be your bank looks like phishing.", "A strange text asked me to verify my account."),
    _t("legal_threat", "legal threats|lawyers", "threatens legal action",
       "My lawyer will be in touch.", "I am going to sue your company.",
       "Expect a letter from my attorney.", "I'm taking this to court."),
    _t("complaint_staff", "staff complaints|rude agents", "complains about a staff member",
       "Your agent was rude to me on the phone.", "The driver was extremely unprofessional.",
       "I want to complain about the store manager.", "Support hung up on me twice."),
    _t("warranty", "warranty claims|repairs under warranty", "makes a warranty claim",
       "My laptop is still under warranty and broke.", "Is the heater covered by the warranty?",
       "I want a repair under the guarantee.", "The warranty should cover this fault."),
    _t("return_label", "return labels|sending items back", "asks how to return an item",
       "How do I send this jacket back?", "Please email me a return label.",
       "I'd like to return the headphones.", "What's the return address?"),
    _t("add_seats", "extra seats|adding users", "asks to add users to an account",
       "We need five more user seats.", "How do I add a colleague to our account?",
       "Please add licences for two new hires.", "Can we increase our seat count?"),
    _t("export_data", "data exports|downloading data", "asks to export data",
       "How can I export all my projects?", "I need a CSV of our records.",
       "Is there a way to download my data?", "Please send an export of our account."),
    _t("gift_card", "gift cards|vouchers", "asks about a gift card",
       "My gift card balance shows zero.", "Can I buy a voucher for a friend?",
       "The gift code says it's already used.", "How do I redeem a gift card?"),
    _t("loyalty", "loyalty points|reward points", "asks about loyalty points",
       "My reward points disappeared.", "How many loyalty points do I have?",
       "Points from my last order never appeared.", "Can I use points on this purchase?"),
    _t("appointment", "appointments|bookings", "wants to reschedule an appointment",
       "Can I move my appointment to Thursday?", "I need to reschedule the installation.",
       "Please change my booking to next week.", "The technician visit time doesn't suit me."),
    _t("security_bug", "security vulnerabilities|security bugs", "reports a security vulnerability",
       "I found a security hole in your login page.", "Your site leaks other users' emails.",
       "There's an XSS bug on the search form.", "I can see another customer's orders by changing the URL."),
    _t("contract", "contract renewals|contract terms", "asks about a contract renewal",
       "When does our contract renew?", "We want to renegotiate the annual contract.",
       "Send me the renewal terms please.", "Our agreement expires next month."),
    # held-out topics: never in a training policy
    _t("lost_package", "lost parcels|missing packages", "reports a lost package",
       "The courier says delivered but nothing arrived.", "My parcel vanished from tracking.",
       "The package was lost in transit.", "Nobody can find my shipment.", seen=False),
    _t("price_match", "price matching|cheaper offers elsewhere", "asks for a price match",
       "Another shop sells this cheaper, will you match?", "Can you match this competitor price?",
       "I saw it for less elsewhere.", "Do you offer price matching?", seen=False),
    _t("accessibility", "accessibility|screen reader support", "raises an accessibility problem",
       "Your site doesn't work with my screen reader.", "The text is too small and can't be enlarged.",
       "Buttons have no labels for blind users.", "The captcha is impossible for me to solve.", seen=False),
    _t("press", "press inquiries|journalists", "comes from a journalist",
       "I'm a reporter writing about your company.", "Could your press office comment on the recall?",
       "Journalist here, requesting an interview.", "We're publishing a story about your prices.", seen=False),
    _t("partnership", "partnership offers|business proposals", "proposes a partnership",
       "We'd love to partner with your brand.", "Interested in a reseller agreement?",
       "Our agency proposes a joint campaign.", "Can we discuss a distribution deal?", seen=False),
    _t("allergy", "allergens|ingredient questions", "asks about allergens",
       "Does this snack contain peanuts?", "Is the sauce gluten free?",
       "I'm allergic to soy, is this safe?", "Which products are dairy free?", seen=False),
    _t("job", "job applications|careers", "asks about a job",
       "Are you hiring engineers?", "I'd like to apply for the warehouse role.",
       "Where do I send my CV?", "Do you have internships this summer?", seen=False),
    _t("tax_exempt", "tax exemptions|VAT exemptions", "asks about tax exemption",
       "We're a charity, can we be VAT exempt?", "How do I add our tax-exempt certificate?",
       "Please remove sales tax from our invoices.", "Our school is exempt from tax.", seen=False),
)

# Record attributes carried by every customer message / support ticket (used by conjunctions).
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "tier": ("VIP", "standard"),
    "priority": ("urgent", "routine"),
    "channel": ("email", "chat", "phone"),
}
# (attribute, value) -> verb phrases a policy uses for "the record has this value"
ATTRIBUTE_PHRASES: dict[tuple[str, str], tuple[str, ...]] = {
    ("tier", "VIP"): ("comes from a VIP customer", "is from a VIP account"),
    ("tier", "standard"): ("comes from a standard customer", "is from a standard account"),
    ("priority", "urgent"): ("is marked urgent", "has urgent priority"),
    ("priority", "routine"): ("is marked routine", "has routine priority"),
    ("channel", "email"): ("arrived by email", "came in through email"),
    ("channel", "chat"): ("arrived by chat", "came in through live chat"),
    ("channel", "phone"): ("arrived by phone", "came in through a phone call"),
}


@dataclass(frozen=True)
class NumericField:
    """A numeric field of a record kind, for threshold policies."""

    name: str
    kind: str               # record kind word used in policies ("expense", "transfer", ...)
    desc: str               # "the expense amount"
    template: str           # record text with {v} and optional {x}
    fillers: tuple[str, ...]  # values for {x}
    thresholds: tuple[float, ...]
    money: bool
    seen: bool = True


FIELDS: tuple[NumericField, ...] = (
    NumericField("expense_amount", "expense", "the expense amount", "Expense line: {x}, {v}.",
                 ("team dinner", "taxi to airport", "conference ticket", "office chairs", "client lunch", "software licence"),
                 (50, 100, 250, 500, 1000), True),
    NumericField("transfer_amount", "transfer", "the transfer amount", "Outgoing transfer of {v} to {x}.",
                 ("Acme Ltd", "a new supplier", "J. Smith", "Northwind GmbH", "an overseas account", "Globex Inc"),
                 (1000, 5000, 10000, 25000, 50000), True),
    NumericField("refund_amount", "refund request", "the refund amount", "Refund request for {v} on order {x}.",
                 ("4411", "1893", "7720", "3058", "9612", "5147"), (20, 50, 100, 200, 500), True),
    NumericField("days_overdue", "invoice", "the number of days overdue", "Invoice {x} is {v} days overdue.",
                 ("INV-204", "INV-871", "INV-333", "INV-560", "INV-918", "INV-127"), (7, 14, 30, 60, 90), False),
    NumericField("seats", "licence request", "the number of licences requested", "Request for {v} software licences for {x}.",
                 ("sales", "the design team", "support", "marketing", "engineering", "finance"), (5, 10, 20, 50, 100), False),
    NumericField("overtime", "timesheet", "the number of overtime hours", "Timesheet from {x}: {v} overtime hours this week.",
                 ("Dana", "Lee", "Priya", "Tom", "Aisha", "Marco"), (4, 8, 12, 20), False),
    # held-out fields
    NumericField("hotel_nights", "hotel expense", "the number of nights", "Expense line: hotel in {x}, {v} nights.",
                 ("Berlin", "Lisbon", "Chicago", "Osaka", "Nairobi", "Lima"), (2, 3, 5, 7), False, seen=False),
    NumericField("attendees", "event booking", "the number of attendees", "Event booking for {v} attendees at {x}.",
                 ("the town hall", "the offsite", "the product launch", "the training day", "the summit", "the gala"),
                 (20, 50, 100, 200), False, seen=False),
)

# Binary answer words: (positive: condition holds, negative: otherwise). Unseen words only in held-out.
POSITIVE_WORDS = ("flag", "alert", "escalate", "review", "hold", "block", "investigate", "audit", "report",
                  "notify", "pause", "inspect", "verify", "warn", "decline", "reject", "stop", "check",
                  # unseen
                  "quarantine", "halt", "scrutinize", "raise")
NEGATIVE_WORDS = ("pass", "ignore", "approve", "allow", "clear", "accept", "proceed", "skip", "fine",
                  "continue", "release", "close", "okay", "done", "keep", "archive",
                  # unseen
                  "dismiss", "greenlight", "settle", "waive")
UNSEEN_WORDS = frozenset({"quarantine", "halt", "scrutinize", "raise", "dismiss", "greenlight", "settle", "waive",
                          "treasury", "concierge", "triage", "vault"})
# Queue names for routing policies.
QUEUES = ("billing", "support", "security", "sales", "legal", "shipping", "accounts", "compliance", "fraud",
          "onboarding", "returns", "tech", "finance", "privacy", "partners", "retention", "payments", "logistics",
          # unseen
          "treasury", "concierge", "triage", "vault")

# Free-text format rules: kind -> (policy phrasings with {w}, regex with {w}, reference reply with {w} and {r}).
FORMAT_RULES: dict[str, tuple[tuple[str, ...], str, str]] = {
    "prefix": (("Start every reply with '{w}:'.", "Each answer must begin with the word {w} followed by a colon.",
                "Open all replies with '{w}:' and then answer normally."),
               r"^\s*{w}:", "{w}: {r}"),
    "signoff": (("End every reply with the sign-off '-- {w}'.", "Finish each answer by signing it '-- {w}'.",
                 "Always close your reply with '-- {w}' on its own."),
                r"--\s*{w}\W*\s*$", "{r} -- {w}"),
    "tag": (("Put the tag [{w}] at the very start of every reply.", "Prefix each answer with the label [{w}].",
             "Every response opens with [{w}]."),
            r"^\s*\[{w}\]", "[{w}] {r}"),
    "json": (("Reply only with a JSON object whose single key is \"{w}\".",
              "Answer in JSON of the form {{\"{w}\": <your reply>}}.",
              "Return your reply as JSON under the key \"{w}\"."),
             r"^\s*\{{\s*\"{w}\"\s*:", "{{\"{w}\": \"{r}\"}}"),
    # held-out rule kind
    "bullet": (("Answer as a bulleted list whose first item is '{w}'.",
                "Reply with bullet points, the first bullet being just '{w}'.",
                "Format your reply as a list starting with the bullet '- {w}'."),
               r"^\s*[-*\u2022]\s*{w}\b", "- {w}\n- {r}"),
}
UNSEEN_FORMAT_RULES = frozenset({"bullet"})
FORMAT_WORDS = ("Noted", "Ack", "Received", "Update", "Support", "Team", "Ops", "Desk", "Care", "Helpdesk",
                "Service", "Reply", "Status", "Info", "Notice", "Answer", "Confirmed", "Logged", "Hello", "Greetings",
                "Summary", "Ticket", "Agent", "Response", "Resolution", "Followup", "Case", "Note", "Alert", "Review",
                "Pending", "Open", "Closed", "Done",
                # unseen
                "Dispatch", "Bulletin", "Memo", "Relay")
UNSEEN_FORMAT_WORDS = frozenset({"Dispatch", "Bulletin", "Memo", "Relay"})

CHANNEL_WORD = {"email": "Email", "chat": "Chat message", "phone": "Phone note"}
