"""What a OneRoster 1.1 / 1.2 CSV delivery looks like: file names, headers, vocabularies."""

# File names are case-sensitive in the spec, but real deliveries send `userprofiles.csv`: we match
# case-insensitively and report the canonical name.
ROSTER_FILES = (
    "orgs.csv",
    "users.csv",
    "classes.csv",
    "enrollments.csv",
    "roles.csv",
    "academicSessions.csv",
    "courses.csv",
    "demographics.csv",
    "userProfiles.csv",
)
MANIFEST = "manifest.csv"
MANIFEST_HEADER = ("propertyName", "value")
# `manifest.version` is 1.0 in the spec; ClassLink-style manifests write `1`.
MANIFEST_VERSIONS = ("1", "1.0")
# `oneroster.version` values and the version Capti reads them as (1.2.1 corrections still say 1.2).
ONEROSTER_VERSIONS = {"1.1": "1.1", "1.1.0": "1.1", "1.2": "1.2", "1.2.0": "1.2", "1.2.1": "1.2"}
KNOWN_FILES = {name.lower(): name for name in (*ROSTER_FILES, MANIFEST)}

# Files Capti needs in every delivery (roles.csv as well for 1.2).
REQUIRED_FILES = ("orgs.csv", "users.csv", "classes.csv", "enrollments.csv")

_LIFECYCLE = ("sourcedId", "status", "dateLastModified")

# Every spec column must be present (ClassLink requires the full template); order is not enforced,
# columns are mapped by name.
HEADERS: dict[tuple[str, str], tuple[str, ...]] = {
    ("1.1", "orgs.csv"): (*_LIFECYCLE, "name", "type", "identifier", "parentSourcedId"),
    ("1.1", "academicSessions.csv"): (
        *_LIFECYCLE,
        "title",
        "type",
        "startDate",
        "endDate",
        "parentSourcedId",
        "schoolYear",
    ),
    ("1.1", "courses.csv"): (
        *_LIFECYCLE,
        "schoolYearSourcedId",
        "title",
        "courseCode",
        "grades",
        "orgSourcedId",
        "subjects",
        "subjectCodes",
    ),
    ("1.1", "classes.csv"): (
        *_LIFECYCLE,
        "title",
        "grades",
        "courseSourcedId",
        "classCode",
        "classType",
        "location",
        "schoolSourcedId",
        "termSourcedIds",
        "subjects",
        "subjectCodes",
        "periods",
    ),
    ("1.1", "users.csv"): (
        *_LIFECYCLE,
        "enabledUser",
        "orgSourcedIds",
        "role",
        "username",
        "userIds",
        "givenName",
        "familyName",
        "middleName",
        "identifier",
        "email",
        "sms",
        "phone",
        "agentSourcedIds",
        "grades",
        "password",
    ),
    ("1.1", "enrollments.csv"): (
        *_LIFECYCLE,
        "classSourcedId",
        "schoolSourcedId",
        "userSourcedId",
        "role",
        "primary",
        "beginDate",
        "endDate",
    ),
    ("1.2", "users.csv"): (
        *_LIFECYCLE,
        "enabledUser",
        "username",
        "userIds",
        "givenName",
        "familyName",
        "middleName",
        "identifier",
        "email",
        "sms",
        "phone",
        "agentSourcedIds",
        "grades",
        "password",
        "userMasterIdentifier",
        "preferredGivenName",
        "preferredMiddleName",
        "preferredFamilyName",
        "primaryOrgSourcedId",
        "pronouns",
    ),
    ("1.2", "roles.csv"): (
        *_LIFECYCLE,
        "userSourcedId",
        "roleType",
        "role",
        "beginDate",
        "endDate",
        "orgSourcedId",
        "userProfileSourcedId",
    ),
}
# users.csv columns that only exist in one version: how the header tells 1.1 from 1.2.
USERS_11_MARKERS = ("orgSourcedIds", "role")
USERS_12_MARKERS = (
    "userMasterIdentifier",
    "preferredGivenName",
    "preferredMiddleName",
    "preferredFamilyName",
    "primaryOrgSourcedId",
    "pronouns",
)
for _name in ("orgs.csv", "academicSessions.csv", "courses.csv", "classes.csv", "enrollments.csv"):
    HEADERS[("1.2", _name)] = HEADERS[("1.1", _name)]

ORG_TYPES = ("department", "school", "district", "local", "state", "national")
USER_ROLES_11 = (
    "administrator",
    "aide",
    "guardian",
    "parent",
    "proctor",
    "relative",
    "student",
    "teacher",
)
USER_ROLES_12 = (
    "aide",
    "counselor",
    "districtAdministrator",
    "guardian",
    "parent",
    "principal",
    "proctor",
    "relative",
    "siteAdministrator",
    "student",
    "systemAdministrator",
    "teacher",
)
ADMIN_ROLES_12 = ("districtAdministrator", "principal", "siteAdministrator", "systemAdministrator")
ROLE_TYPES = ("primary", "secondary")
ENROLLMENT_ROLES = ("administrator", "proctor", "student", "teacher")
CLASS_TYPES = ("homeroom", "scheduled")
STATUSES = ("active", "tobedeleted")
BOOLEANS = ("true", "false")
# CEDS "Entry Grade Level" codes (ceds.ed.gov TermId 7100).
GRADE_CODES = (
    "IT",
    "PR",
    "PK",
    "TK",
    "KG",
    *(f"{n:02d}" for n in range(1, 14)),
    "PS",
    "UG",
    "Other",
)
# Real files say `K` or `9`; these map unambiguously onto CEDS codes.
GRADE_ALIASES = {"K": "KG", **{str(n): f"{n:02d}" for n in range(1, 14)}}

MODES = ("bulk", "delta", "absent")

# Columns whose values may appear in the report: identifiers and vocabularies, never personal data.
REPORTABLE_VALUE_COLUMNS = frozenset(
    {
        "sourcedId",
        "status",
        "type",
        "role",
        "roleType",
        "classType",
        "enabledUser",
        "primary",
        "grades",
        "orgSourcedIds",
        "orgSourcedId",
        "parentSourcedId",
        "classSourcedId",
        "schoolSourcedId",
        "userSourcedId",
        "courseSourcedId",
        "termSourcedIds",
    }
)
