"""Turn validated OneRoster frames into Capti's roster model.

Capti's rules: school orgs become locations and district orgs mark district-level membership
(other org types are ignored); `administrator` becomes School Admin, or District Admin when one of
the user's orgs is the district; OneRoster 1.2 admin roles map the same way by org type; roles
Capti has no use for (parent, guardian, aide, ...) are skipped with a warning.
"""

from dataclasses import dataclass, field, replace

import pandas as pd

from capti_pipeline.lib import oneroster_format as fmt
from capti_pipeline.lib.fastops import duplicated, isin, map_distinct
from capti_pipeline.lib.issues import WARNING, Issue
from capti_pipeline.lib.validate import ValidatedDelivery

ENTITIES = ("locations", "users", "classes", "enrollments")
ENTITY_SOURCE_FILE = {
    "locations": "orgs.csv",
    "users": "users.csv",
    "classes": "classes.csv",
    "enrollments": "enrollments.csv",
}
# Value columns per entity, in store order; a change in any of them is an update.
VALUE_COLUMNS: dict[str, tuple[str, ...]] = {
    "locations": ("name", "type"),
    "users": (
        "enabled",
        "role",
        "username",
        "givenName",
        "familyName",
        "email",
        "identifier",
        "grades",
        "locations",
    ),
    "classes": ("title", "location"),
    "enrollments": ("class", "user", "role"),
}
CAPTI_ROLES = ("student", "teacher", "school_admin", "district_admin")
ROLE_LABELS = {
    False: {
        "student": "Student",
        "teacher": "Teacher",
        "school_admin": "School Admin",
        "district_admin": "District Admin",
    },
    True: {
        "student": "Student",
        "teacher": "Teacher",
        "school_admin": "Location Admin",
        "district_admin": "Super Admin",
    },
}
_SAMPLE = 5


@dataclass
class ResolvedRoster:
    """Capti's roster as the delivery states it.

    `frames` hold the active records; `removals` the sourcedIds the delivery marks `tobedeleted`;
    `modes` say per entity whether the file is the complete set (bulk), a change list (delta) or
    absent; `delivered_schools` is the scope inside which bulk deletions may happen.
    """

    frames: dict[str, pd.DataFrame]
    removals: dict[str, set[str]]
    modes: dict[str, str]
    protected: dict[str, set[str]]
    delivered_schools: set[str]
    district_delivered: bool
    issues: list[Issue] = field(default_factory=list)
    rows_read: dict[str, int] = field(default_factory=dict)
    file_modes: dict[str, str] = field(default_factory=dict)


def row_hash(frame: pd.DataFrame, columns: tuple[str, ...]) -> pd.Series:
    """Stable 63-bit fingerprint of the value columns, so unchanged rows compare as one integer."""
    if frame.empty:
        return pd.Series([], dtype="int64", index=frame.index)
    hashed = pd.util.hash_pandas_object(frame[list(columns)].astype(str), index=False)
    return (hashed.to_numpy() >> 1).astype("int64")


def _split_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _summarise_skipped(file: str, what: str, ids: pd.Series, issues: list[Issue]) -> None:
    if ids.empty:
        return
    sample = ", ".join(ids.head(_SAMPLE))
    more = f" and {len(ids) - _SAMPLE} more" if len(ids) > _SAMPLE else ""
    issues.append(Issue(WARNING, file, 0, "role", "", f"{len(ids)} {what}: {sample}{more}"))


def resolve_roster(
    delivery: ValidatedDelivery, known_org_types: dict[str, str] | None = None
) -> ResolvedRoster:
    """Pure function: validated frames (+ the org types the store knows) → Capti roster."""
    issues: list[Issue] = list(delivery.issues)
    # Resolution may reject more rows (duplicate usernames); never mutate the caller's delivery.
    delivery = replace(delivery, protected={k: set(v) for k, v in delivery.protected.items()})
    frames = delivery.frames
    modes = {
        entity: delivery.modes.get(ENTITY_SOURCE_FILE[entity], "absent") for entity in ENTITIES
    }
    removals: dict[str, set[str]] = {entity: set() for entity in ENTITIES}

    org_types = dict(known_org_types or {})
    orgs = frames.get("orgs")
    locations = pd.DataFrame(columns=["sourcedId", "name", "type"], dtype="str")
    delivered_schools: set[str] = set()
    district_delivered = False
    if orgs is not None:
        live = orgs[orgs["status"].ne("tobedeleted")]
        org_types.update(zip(live["sourcedId"], live["type"], strict=True))
        kept = live[live["type"].isin(("school", "district"))]
        locations = kept[["sourcedId", "name", "type"]].reset_index(drop=True)
        delivered_schools = set(kept["sourcedId"][kept["type"].eq("school")])
        district_delivered = bool(kept["type"].eq("district").any())
        gone = orgs[orgs["status"].eq("tobedeleted") & orgs["type"].isin(("school", "district"))]
        removals["locations"] = set(gone["sourcedId"])
        ignored = live[~live["type"].isin(("school", "district"))]
        if not ignored.empty:
            issues.append(
                Issue(
                    WARNING,
                    "orgs.csv",
                    0,
                    "type",
                    "",
                    f"{len(ignored)} org(s) of type "
                    f"{', '.join(sorted(set(ignored['type'])))} ignored (only schools and the "
                    "district are used)",
                )
            )
    if modes["locations"] != "bulk":
        # A partial or absent orgs file leaves every known school in scope.
        delivered_schools |= {o for o, t in org_types.items() if t == "school"}
        district_delivered = True

    users, user_removals = _resolve_users(delivery, org_types, issues)
    removals["users"] = user_removals
    classes, class_removals = _resolve_classes(frames.get("classes"))
    removals["classes"] = class_removals
    enrollments, enrollment_removals = _resolve_enrollments(
        frames.get("enrollments"), users, delivery, issues
    )
    removals["enrollments"] = enrollment_removals

    resolved = {
        "locations": locations,
        "users": users,
        "classes": classes,
        "enrollments": enrollments,
    }
    for entity, frame in resolved.items():
        frame = frame.reset_index(drop=True)
        frame["row_hash"] = row_hash(frame, VALUE_COLUMNS[entity])
        resolved[entity] = frame
    protected = {
        "locations": set(delivery.protected.get("orgs", set())),
        "users": set(delivery.protected.get("users", set())),
        "classes": set(delivery.protected.get("classes", set())),
        "enrollments": set(delivery.protected.get("enrollments", set())),
    }
    return ResolvedRoster(
        resolved,
        removals,
        modes,
        protected,
        delivered_schools,
        district_delivered,
        issues,
        dict(delivery.rows_read),
        dict(delivery.modes),
    )


_USER_COLUMNS = ["sourcedId", *VALUE_COLUMNS["users"]]


def _empty_users() -> pd.DataFrame:
    frame = pd.DataFrame(columns=_USER_COLUMNS, dtype="str")
    frame["enabled"] = frame["enabled"].astype(bool)
    return frame


def _resolve_users(
    delivery: ValidatedDelivery, org_types: dict[str, str], issues: list[Issue]
) -> tuple[pd.DataFrame, set[str]]:
    users = delivery.frames.get("users")
    if users is None:
        return _empty_users(), set()
    removals = set(users["sourcedId"][users["status"].eq("tobedeleted")])
    users = users[users["status"].ne("tobedeleted")]
    if delivery.version == "1.2":
        role_of, orgs_of = _memberships_from_roles(delivery.frames.get("roles"), org_types)
        capti_role = users["sourcedId"].map(role_of)
        no_role = capti_role.isna()
        # In a delta, a user row without roles rows cannot be resolved: it is left as it is.
        why = (
            "without a roles.csv row in this delta skipped (their accounts are left as they are)"
            if delivery.modes.get("roles.csv") == "delta"
            else "without a role Capti imports (student, teacher or an administrator role) skipped"
        )
        _summarise_skipped("roles.csv", f"user(s) {why}", users["sourcedId"][no_role], issues)
        users = users[~no_role].copy()
        users["capti_role"] = capti_role[~no_role].astype("str")
        users["schools"] = users["sourcedId"].map(orgs_of).fillna("").astype("str")
    else:
        supported = users["role"].isin(("student", "teacher", "administrator"))
        for role in sorted(set(users["role"][~supported])):
            _summarise_skipped(
                "users.csv",
                f"user(s) with role {role} skipped (Capti imports students, teachers and "
                "administrators)",
                users["sourcedId"][users["role"].eq(role)],
                issues,
            )
        users = users[supported].copy()
        schools, in_district = _org_memberships(users["orgSourcedIds"], org_types)
        users["schools"] = schools
        admin = users["role"].eq("administrator")
        users["capti_role"] = users["role"].where(~admin, "school_admin")
        users.loc[admin & in_district, "capti_role"] = "district_admin"
    frame = pd.DataFrame(
        {
            "sourcedId": users["sourcedId"],
            "enabled": users["enabledUser"].eq("true"),
            "role": users["capti_role"].astype("str"),
            "username": users["username"],
            "givenName": users["givenName"],
            "familyName": users["familyName"],
            "email": users["email"],
            "identifier": users["identifier"],
            "grades": _normalise_list_column(users["grades"]),
            "locations": users["schools"].astype("str"),
        }
    )
    duplicate_names = duplicated(frame["username"])
    if duplicate_names.any():
        for index, sourced_id in frame["sourcedId"][duplicate_names].items():
            issues.append(
                Issue(
                    "error",
                    "users.csv",
                    int(index) + 2,
                    "username",
                    sourced_id,
                    "username used by more than one user in this delivery; rows rejected "
                    "(usernames are unique within a district)",
                )
            )
        delivery.protected.setdefault("users", set()).update(frame["sourcedId"][duplicate_names])
        frame = frame[~duplicate_names]
    return frame.reset_index(drop=True), removals


def _normalise_list_column(values: pd.Series) -> pd.Series:
    """`_normalise_list_cell` of every value; only list cells (with a comma) go through Python."""
    out = values.str.strip()
    lists = values.str.contains(",", regex=False)
    if lists.any():
        out[lists] = values[lists].map(_normalise_list_cell)
    return out


def _normalise_list_cell(value: str) -> str:
    if "," not in value:
        return value.strip()
    return ",".join(_split_list(value))


def _org_memberships(
    org_lists: pd.Series, org_types: dict[str, str]
) -> tuple[pd.Series, pd.Series]:
    """Per user: sorted school ids (comma-joined) and whether one of the orgs is a district."""
    single = ~org_lists.str.contains(",", regex=False)
    # Few distinct org ids: their types are looked up once each.
    types = map_distinct(org_lists, lambda org: org_types.get(org, ""))
    schools = org_lists.where(single & types.eq("school"), "")
    in_district = single & types.eq("district")
    for index, value in org_lists[~single].items():
        ids = _split_list(value)
        schools[index] = ",".join(sorted({i for i in ids if org_types.get(i) == "school"}))
        in_district[index] = any(org_types.get(i) == "district" for i in ids)
    return schools, in_district


def _memberships_from_roles(
    roles: pd.DataFrame | None, org_types: dict[str, str]
) -> tuple[dict[str, str], dict[str, str]]:
    """OneRoster 1.2: one Capti role per user from all its roles.csv rows, and its schools.

    Primary and secondary rows count alike. The highest privilege wins (district_admin >
    school_admin > teacher > student): an administrator role (districtAdministrator,
    siteAdministrator, principal, systemAdministrator) held at a district org makes a District
    Admin, anywhere else a School Admin, exactly as 1.1's `administrator` does by org. A user's
    schools are the school orgs where it holds a role Capti imports (a guardian row at another
    school adds nothing).
    """
    if roles is None or roles.empty:
        return {}, {}
    live = roles[roles["status"].ne("tobedeleted")]
    org_type = live["orgSourcedId"].map(org_types).fillna("")
    role = live["role"]
    admin = role.isin(fmt.ADMIN_ROLES_12)
    capti = pd.Series(pd.NA, index=live.index, dtype="object")
    capti[role.eq("student")] = "student"
    capti[role.eq("teacher")] = "teacher"
    capti[admin] = "school_admin"
    capti[admin & org_type.eq("district")] = "district_admin"
    imported = capti.notna()
    ranked = pd.DataFrame(
        {"user": live["userSourcedId"][imported], "role": capti[imported].astype("str")}
    )
    ranked["rank"] = ranked["role"].map(_ROLE_RANK)
    best = ranked.sort_values("rank", kind="stable").groupby("user")["role"].last()
    schools = (
        pd.DataFrame({"user": live["userSourcedId"], "org": live["orgSourcedId"]})[
            imported & org_type.eq("school")
        ]
        .drop_duplicates()
        .sort_values("org")
        .groupby("user")["org"]
        .agg(",".join)
    )
    orgs_of = {user: str(schools.get(user, "")) for user in best.index}
    return {str(k): str(v) for k, v in best.items()}, orgs_of


_ROLE_RANK = {"student": 1, "teacher": 2, "school_admin": 3, "district_admin": 4}


def _resolve_classes(classes: pd.DataFrame | None) -> tuple[pd.DataFrame, set[str]]:
    if classes is None:
        return pd.DataFrame(columns=["sourcedId", "title", "location"], dtype="str"), set()
    removals = set(classes["sourcedId"][classes["status"].eq("tobedeleted")])
    live = classes[classes["status"].ne("tobedeleted")]
    frame = pd.DataFrame(
        {
            "sourcedId": live["sourcedId"],
            "title": live["title"],
            "location": live["schoolSourcedId"],
        }
    )
    return frame.reset_index(drop=True), removals


def _resolve_enrollments(
    enrollments: pd.DataFrame | None,
    users: pd.DataFrame,
    delivery: ValidatedDelivery,
    issues: list[Issue],
) -> tuple[pd.DataFrame, set[str]]:
    if enrollments is None:
        return pd.DataFrame(columns=["sourcedId", "class", "user", "role"], dtype="str"), set()
    deleting = enrollments["status"].eq("tobedeleted")
    removals = set(enrollments["sourcedId"][deleting])
    live = enrollments[~deleting] if deleting.any() else enrollments
    rejected_user = isin(live["userSourcedId"], delivery.protected.get("users", set()))
    if rejected_user.any():
        delivery.protected.setdefault("enrollments", set()).update(live["sourcedId"][rejected_user])
        live = live[~rejected_user]
    if delivery.modes.get("users.csv") == "bulk":
        # Users skipped for their role (parents, aides) cannot be enrolled in Capti. (A bulk
        # file's enrollments only point at its own users, validation saw to that: the few
        # delivered users that were not kept are the ones to look for.)
        delivered = delivery.frames["users"]["sourcedId"]
        dropped = delivered[~isin(delivered, users["sourcedId"])]
        skipped_user = isin(live["userSourcedId"], dropped)
        _summarise_skipped(
            "enrollments.csv",
            "enrollment(s) of users Capti does not import skipped",
            live["sourcedId"][skipped_user],
            issues,
        )
        if skipped_user.any():
            live = live[~skipped_user]
    frame = pd.DataFrame(
        {
            "sourcedId": live["sourcedId"],
            "class": live["classSourcedId"],
            "user": live["userSourcedId"],
            "role": live["role"],
        }
    )
    return frame.reset_index(drop=True), removals
