#!/usr/bin/env python3
"""Check the workspace's QAPI schema (schema/*.json) and its seed fixtures.

Standard library only.  Usage:

    python3 schema/tests/check_schema.py [-v] [path/to/qapi-schema.json]

What it checks:

* syntax: QEMU's QAPI dialect (single-quoted strings, ``true``/``false``,
  ``#`` comments, doc blocks between ``##`` lines); duplicate keys are errors;
* expressions: only the keys the workspace's generator supports (no ``if``,
  ``gen``, ``success-response``); flat unions only;
* names: QEMU's naming rules (CamelCase types, lower-case commands and
  members, UPPER_CASE events) with the exceptions granted by the pragmas;
* semantics: every referenced type exists, no duplicate definitions, no
  member clashes (also after mapping '-' to '_'), struct bases are structs,
  union discriminators are non-optional enum members of the base, union
  branches name values of that enum and cover all of them, branch types
  are structs, alternate branches are distinguishable on the wire, boxed
  commands and events name a type, command results are objects unless the
  pragma allows otherwise;
* documentation: every definition has a doc block whose first line is
  ``@Name:``, every own member, argument, enum value, alternate branch and
  feature is documented, nothing undocumented is mentioned;
* fixtures: every line of tests/seed-commands.txt and
  tests/seed-definitions.txt is satisfied by the schema.
"""

import os
import re
import sys

BUILTINS = {
    'str': 'string', 'int': 'number', 'int8': 'number', 'int16': 'number',
    'int32': 'number', 'int64': 'number', 'uint8': 'number',
    'uint16': 'number', 'uint32': 'number', 'uint64': 'number',
    'size': 'number', 'number': 'number', 'bool': 'boolean',
    'null': 'null', 'any': 'value', 'QType': 'string',
}

ALLOWED_KEYS = {
    'enum': ({'enum', 'data'}, {'prefix', 'features'}),
    'struct': ({'struct', 'data'}, {'base', 'features'}),
    'union': ({'union', 'base', 'discriminator', 'data'}, {'features'}),
    'alternate': ({'alternate', 'data'}, {'features'}),
    'command': ({'command'},
                {'data', 'returns', 'boxed', 'allow-oob', 'features'}),
    'event': ({'event'}, {'data', 'boxed', 'features'}),
}

SECTION_TAGS = ('Returns', 'Since', 'Note', 'Notes', 'Example', 'Examples',
                'TODO')


class SchemaError(Exception):
    """An error in the schema, with its location."""


# ---------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------

class Doc:
    """A doc block: its symbol, member descriptions, features, sections."""

    def __init__(self, fname, line):
        self.fname = fname
        self.line = line
        self.symbol = None
        self.members = {}
        self.features = {}
        self.sections = []
        self.body = []


def parse_doc(lines, fname, line):
    """Parse the text lines (without the leading '# ') of a doc block."""
    doc = Doc(fname, line)
    if not lines:
        raise SchemaError('%s:%d: empty doc block' % (fname, line))
    m = re.match(r'^@([A-Za-z0-9_.-]+):\s*$', lines[0])
    if not m:
        raise SchemaError('%s:%d: doc block must start with "# @Name:", got %r'
                          % (fname, line, lines[0]))
    doc.symbol = m.group(1)
    mode = 'body'          # body -> members -> features -> sections
    current = None
    for i, text in enumerate(lines[1:], start=1):
        lineno = line + i + 1
        m = re.match(r'^@([A-Za-z0-9_.*-]+):(.*)$', text)
        tag = re.match(r'^(%s):(.*)$' % '|'.join(SECTION_TAGS), text)
        if text.strip() == 'Features:':
            if mode == 'sections':
                raise SchemaError('%s:%d: "Features:" must come before tagged '
                                  'sections' % (fname, lineno))
            mode = 'features'
            current = None
            continue
        if m:
            name = m.group(1)
            if mode == 'sections':
                raise SchemaError('%s:%d: "@%s:" after a tagged section'
                                  % (fname, lineno, name))
            if mode == 'body':
                mode = 'members'
            target = doc.features if mode == 'features' else doc.members
            if name in target:
                raise SchemaError('%s:%d: "@%s" documented twice'
                                  % (fname, lineno, name))
            desc = m.group(2).strip()
            if not desc:
                raise SchemaError('%s:%d: "@%s:" has no description'
                                  % (fname, lineno, name))
            target[name] = desc
            current = (target, name)
            continue
        if tag:
            mode = 'sections'
            doc.sections.append([tag.group(1), tag.group(2).strip()])
            current = None
            continue
        if text.startswith(' ') and current is not None and text.strip():
            target, name = current
            target[name] += ' ' + text.strip()
            continue
        if not text.strip():
            current = None
            continue
        if mode == 'sections':
            doc.sections[-1][1] += ' ' + text.strip()
        elif mode == 'body':
            doc.body.append(text)
        else:
            raise SchemaError('%s:%d: unindented text %r after member '
                              'descriptions (indent continuation lines)'
                              % (fname, lineno, text))
    return doc


class Parser:
    """Recursive-descent parser of one schema file."""

    def __init__(self, fname):
        self.fname = fname
        with open(fname, encoding='utf-8') as f:
            self.src = f.read()
        self.pos = 0
        self.line = 1
        self.pending_doc = None

    def error(self, msg):
        return SchemaError('%s:%d: %s' % (self.fname, self.line, msg))

    def parse(self):
        exprs = []
        while True:
            self.skip_space(top=True)
            if self.pos >= len(self.src):
                if self.pending_doc is not None:
                    raise SchemaError('%s:%d: doc block not followed by a '
                                      'definition' % (self.fname,
                                                      self.pending_doc.line))
                return exprs
            line = self.line
            doc = self.pending_doc
            self.pending_doc = None
            expr = self.value(0)
            if not isinstance(expr, dict):
                raise SchemaError('%s:%d: top-level expression must be an '
                                  'object' % (self.fname, line))
            exprs.append((expr, doc, self.fname, line))

    def skip_space(self, top=False):
        while self.pos < len(self.src):
            c = self.src[self.pos]
            if c == '\n':
                self.line += 1
                self.pos += 1
            elif c in ' \t\r':
                self.pos += 1
            elif c == '#':
                at_start = self.pos == 0 or self.src[self.pos - 1] == '\n'
                end = self.src.find('\n', self.pos)
                if end < 0:
                    end = len(self.src)
                text = self.src[self.pos:end]
                if top and at_start and text.rstrip() == '##':
                    self.doc_block()
                else:
                    self.pos = end
            else:
                return

    def doc_block(self):
        start = self.line
        if self.pending_doc is not None:
            raise self.error('doc block not followed by a definition')
        lines = []
        self.pos = self.src.find('\n', self.pos)
        while True:
            if self.pos < 0 or self.pos >= len(self.src):
                raise SchemaError('%s:%d: unterminated doc block'
                                  % (self.fname, start))
            self.pos += 1
            self.line += 1
            end = self.src.find('\n', self.pos)
            if end < 0:
                end = len(self.src)
            text = self.src[self.pos:end].rstrip()
            self.pos = end
            if text == '##':
                break
            if not text.startswith('#'):
                raise self.error('doc block line must start with "#"')
            if len(text) > 1 and text[1] != ' ':
                raise self.error('doc block text must follow "# "')
            lines.append(text[2:])
        self.pending_doc = parse_doc(lines, self.fname, start + 1)

    def value(self, depth):
        if depth > 64:
            raise self.error('expression nests too deeply')
        self.skip_space()
        if self.pos >= len(self.src):
            raise self.error('unexpected end of file')
        c = self.src[self.pos]
        if c == '{':
            self.pos += 1
            obj = {}
            self.skip_space()
            if self.eat('}'):
                return obj
            while True:
                self.skip_space()
                key = self.value(depth + 1)
                if not isinstance(key, str):
                    raise self.error('object keys must be strings')
                if key in obj:
                    raise self.error('duplicate key %r' % key)
                self.skip_space()
                if not self.eat(':'):
                    raise self.error("expected ':'")
                obj[key] = self.value(depth + 1)
                self.skip_space()
                if self.eat('}'):
                    return obj
                if not self.eat(','):
                    raise self.error("expected ',' or '}'")
        if c == '[':
            self.pos += 1
            items = []
            self.skip_space()
            if self.eat(']'):
                return items
            while True:
                items.append(self.value(depth + 1))
                self.skip_space()
                if self.eat(']'):
                    return items
                if not self.eat(','):
                    raise self.error("expected ',' or ']'")
        if c == "'":
            return self.string()
        for word, val in (('true', True), ('false', False)):
            if self.src.startswith(word, self.pos):
                self.pos += len(word)
                return val
        raise self.error('stray %r' % c)

    def eat(self, c):
        if self.src.startswith(c, self.pos):
            self.pos += 1
            return True
        return False

    def string(self):
        self.pos += 1
        out = []
        while True:
            if self.pos >= len(self.src) or self.src[self.pos] == '\n':
                raise self.error('unterminated string')
            c = self.src[self.pos]
            if c == "'":
                self.pos += 1
                return ''.join(out)
            if c == '\\':
                nxt = self.src[self.pos + 1:self.pos + 2]
                if nxt not in ('\\', "'", '"', '/'):
                    raise self.error('unknown escape \\%s' % nxt)
                out.append(nxt)
                self.pos += 2
                continue
            if ord(c) > 127:
                raise self.error('non-ASCII character in string')
            out.append(c)
            self.pos += 1


def load(path):
    """Parse path and everything it includes; return (exprs, file order)."""
    exprs = []
    order = []
    seen = set()

    def visit(fname, depth):
        if depth > 16:
            raise SchemaError('%s: includes nest too deeply' % fname)
        real = os.path.realpath(fname)
        if real in seen:
            return
        seen.add(real)
        order.append(fname)
        for expr, doc, f, line in Parser(fname).parse():
            if 'include' in expr:
                if len(expr) != 1 or not isinstance(expr['include'], str):
                    raise SchemaError('%s:%d: bad include' % (f, line))
                if doc is not None:
                    raise SchemaError('%s:%d: include has a doc block'
                                      % (f, line))
                visit(os.path.join(os.path.dirname(fname), expr['include']),
                      depth + 1)
            else:
                exprs.append((expr, doc, f, line))

    visit(path, 0)
    return exprs, order


# ---------------------------------------------------------------------------
# The schema model
# ---------------------------------------------------------------------------

class Member:
    def __init__(self, name, typ, optional, features):
        self.name = name
        self.type = typ
        self.optional = optional
        self.features = features


class Definition:
    def __init__(self, meta, name, expr, doc, fname, line):
        self.meta = meta
        self.name = name
        self.expr = expr
        self.doc = doc
        self.fname = fname
        self.line = line

    @property
    def where(self):
        return '%s:%d' % (os.path.basename(self.fname), self.line)


def type_of(value, where):
    """Normalize a member's type: 'T', ['T'] or {'type': ..., 'features'}."""
    features = []
    if isinstance(value, dict):
        extra = set(value) - {'type', 'features'}
        if extra or 'type' not in value:
            raise SchemaError('%s: member type dict has keys %s'
                              % (where, sorted(value)))
        features = value.get('features', [])
        value = value['type']
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], str):
            raise SchemaError('%s: array type must have one element type'
                              % where)
        return value, features
    if not isinstance(value, str):
        raise SchemaError('%s: bad member type %r' % (where, value))
    return value, features


def members_of_dict(data, where, allow_optional=True):
    if not isinstance(data, dict):
        raise SchemaError('%s: members must be an object' % where)
    out = []
    for key, value in data.items():
        optional = key.startswith('*')
        name = key[1:] if optional else key
        if optional and not allow_optional:
            raise SchemaError('%s: member %r cannot be optional'
                              % (where, name))
        typ, features = type_of(value, '%s member %s' % (where, name))
        out.append(Member(name, typ, optional, features))
    return out


def feature_names(value, where):
    if value is None:
        return []
    if not isinstance(value, list):
        raise SchemaError("%s: 'features' must be a list" % where)
    names = []
    for f in value:
        if isinstance(f, dict):
            if set(f) - {'name'}:
                raise SchemaError('%s: feature keys %s unsupported'
                                  % (where, sorted(f)))
            f = f.get('name')
        if not isinstance(f, str):
            raise SchemaError('%s: bad feature %r' % (where, f))
        names.append(f)
    return names


class Schema:
    def __init__(self, path):
        self.errors = []
        self.notes = []
        exprs, self.files = load(path)
        self.pragma = {'doc-required': False,
                       'command-name-exceptions': [],
                       'command-returns-exceptions': [],
                       'member-name-exceptions': []}
        self.defs = {}
        self.order = []
        for expr, doc, fname, line in exprs:
            if 'pragma' in expr:
                self.add_pragma(expr, doc, fname, line)
                continue
            meta = next(iter(expr))
            if meta not in ALLOWED_KEYS:
                self.err('%s:%d: unknown expression kind %r'
                         % (fname, line, meta))
                continue
            required, optional = ALLOWED_KEYS[meta]
            keys = set(expr)
            if not required <= keys:
                self.err('%s:%d: %s lacks %s' % (fname, line, meta,
                                                 sorted(required - keys)))
            if keys - required - optional:
                self.err('%s:%d: %s %r has unsupported keys %s'
                         % (fname, line, meta, expr.get(meta),
                            sorted(keys - required - optional)))
            name = expr[meta]
            if not isinstance(name, str):
                self.err('%s:%d: name must be a string' % (fname, line))
                continue
            d = Definition(meta, name, expr, doc, fname, line)
            if name in BUILTINS:
                self.err('%s: %r redefines a built-in type' % (d.where, name))
            if name in self.defs:
                self.err('%s: %r already defined at %s'
                         % (d.where, name, self.defs[name].where))
                continue
            self.defs[name] = d
            self.order.append(d)

    def err(self, msg):
        self.errors.append(msg)

    def add_pragma(self, expr, doc, fname, line):
        if len(expr) != 1 or not isinstance(expr['pragma'], dict):
            self.err('%s:%d: bad pragma' % (fname, line))
            return
        for key, value in expr['pragma'].items():
            if key not in self.pragma:
                self.err('%s:%d: unknown pragma %r' % (fname, line, key))
            elif key == 'doc-required':
                if not isinstance(value, bool):
                    self.err('%s:%d: doc-required wants a bool'
                             % (fname, line))
                self.pragma[key] = value
            else:
                if not (isinstance(value, list)
                        and all(isinstance(v, str) for v in value)):
                    self.err('%s:%d: pragma %r wants a list of strings'
                             % (fname, line, key))
                    continue
                self.pragma[key] = self.pragma[key] + value

    # -- lookups -----------------------------------------------------------

    def meta(self, name):
        if isinstance(name, list):
            return 'array'
        if name in BUILTINS:
            return 'builtin'
        d = self.defs.get(name)
        return d.meta if d else None

    def enum_values(self, name):
        d = self.defs.get(name)
        if d is None or d.meta != 'enum':
            return None
        out = []
        for v in d.expr['data']:
            out.append(v['name'] if isinstance(v, dict) else v)
        return out

    def base_members(self, d):
        """The members of a union's base (inline or named)."""
        base = d.expr.get('base')
        if isinstance(base, dict):
            return members_of_dict(base, d.where + ' base')
        if isinstance(base, str) and self.meta(base) == 'struct':
            return self.struct_members(base)
        return []

    def struct_members(self, name, seen=None):
        """All members of a struct, its bases' first."""
        d = self.defs.get(name)
        if d is None or d.meta != 'struct':
            return []
        seen = seen or set()
        if name in seen:
            return []
        seen.add(name)
        out = []
        base = d.expr.get('base')
        if isinstance(base, str):
            out.extend(self.struct_members(base, seen))
        out.extend(members_of_dict(d.expr['data'], d.where))
        return out

    def type_members(self, name):
        """Members a JSON object of this type may carry, as name -> Member.

        For a union: the base members and the members of every branch."""
        d = self.defs.get(name)
        if d is None:
            return {}
        if d.meta == 'struct':
            return {m.name: m for m in self.struct_members(name)}
        if d.meta == 'union':
            out = {m.name: m for m in self.base_members(d)}
            for branch in d.expr['data'].values():
                btype = branch['type'] if isinstance(branch, dict) else branch
                for m in self.struct_members(btype):
                    out.setdefault(m.name, m)
            return out
        return {}

    def args_of(self, d):
        """A command's or event's arguments as name -> Member."""
        data = d.expr.get('data')
        if data is None:
            return {}
        if isinstance(data, dict):
            return {m.name: m for m in members_of_dict(data, d.where)}
        return self.type_members(data)

    # -- checks ------------------------------------------------------------

    def check(self):
        for d in self.order:
            try:
                self.check_name(d)
                getattr(self, 'check_' + d.meta)(d)
                self.check_doc(d)
            except SchemaError as e:
                msg = str(e)
                if not msg.startswith(d.where):
                    msg = '%s: %s' % (d.where, msg)
                self.err(msg)
        self.check_pragma_lists()

    def check_pragma_lists(self):
        for key in ('command-name-exceptions', 'command-returns-exceptions'):
            for name in self.pragma[key]:
                if self.meta(name) != 'command':
                    self.err('pragma %s names %r, which is no command'
                             % (key, name))
        for name in self.pragma['member-name-exceptions']:
            if name not in self.defs:
                self.err('pragma member-name-exceptions names unknown %r'
                         % name)

    def check_name(self, d):
        name = d.name
        if d.meta == 'event':
            if not re.match(r'^[A-Z][A-Z0-9_]*$', name):
                raise SchemaError('event name %r should be UPPER_CASE' % name)
        elif d.meta == 'command':
            allow_us = name in self.pragma['command-name-exceptions']
            pattern = r'^(x-)?[a-z][a-z0-9_-]*$' if allow_us else \
                r'^(x-)?[a-z][a-z0-9-]*$'
            if not re.match(pattern, name):
                raise SchemaError('command name %r should be lower-case with '
                                  "'-' (or in command-name-exceptions)"
                                  % name)
            if not allow_us and '_' in name:
                raise SchemaError('command name %r uses "_"' % name)
        else:
            if not re.match(r'^[A-Z][A-Za-z0-9]*[a-z][A-Za-z0-9]*$', name):
                raise SchemaError('type name %r should be CamelCase' % name)
            if name.endswith('List'):
                raise SchemaError("type name %r should not end in 'List'"
                                  % name)

    def check_member_name(self, owner, name, what='member'):
        exception = owner in self.pragma['member-name-exceptions']
        probe = name
        if what == 'value' and probe[:1].isdigit():
            probe = 'd' + probe            # enum values may start with digits
        pattern = r'^(x-)?[A-Za-z][A-Za-z0-9_-]*$' if exception else \
            r'^(x-)?[a-z][a-z0-9-]*$'
        if not re.match(pattern, probe):
            raise SchemaError('%s %r of %r breaks the naming rules%s'
                              % (what, name, owner, '' if exception else
                                 ' (or add %r to member-name-exceptions)'
                                 % owner))

    def check_type_ref(self, typ, where, allow_array=True):
        if isinstance(typ, list):
            if not allow_array:
                raise SchemaError('%s: array not allowed here' % where)
            typ = typ[0]
        if self.meta(typ) is None:
            raise SchemaError('%s: unknown type %r' % (where, typ))
        if self.meta(typ) in ('command', 'event'):
            raise SchemaError('%s: %r is not a type' % (where, typ))

    def check_members(self, owner, members, where):
        seen = {}
        for m in members:
            self.check_member_name(owner, m.name)
            self.check_type_ref(m.type, '%s member %r' % (where, m.name))
            feature_names(m.features, where)
            cname = m.name.replace('-', '_').lower()
            if cname in seen:
                raise SchemaError('%s: member %r clashes with %r'
                                  % (where, m.name, seen[cname]))
            seen[cname] = m.name

    def check_enum(self, d):
        data = d.expr['data']
        if not isinstance(data, list) or not data:
            raise SchemaError("enum 'data' must be a non-empty list")
        seen = {}
        for v in data:
            if isinstance(v, dict):
                if 'name' not in v or set(v) - {'name', 'features'}:
                    raise SchemaError('bad enum value %r' % v)
                feature_names(v.get('features'), d.where)
                v = v['name']
            if not isinstance(v, str):
                raise SchemaError('bad enum value %r' % v)
            self.check_member_name(d.name, v, 'value')
            cname = v.replace('-', '_').lower()
            if cname in seen:
                raise SchemaError('enum value %r clashes with %r'
                                  % (v, seen[cname]))
            seen[cname] = v
        if 'prefix' in d.expr and not isinstance(d.expr['prefix'], str):
            raise SchemaError("'prefix' must be a string")
        feature_names(d.expr.get('features'), d.where)

    def check_struct(self, d):
        base = d.expr.get('base')
        if base is not None:
            if not isinstance(base, str) or self.meta(base) != 'struct':
                raise SchemaError("'base' %r must name a struct" % (base,))
            chain, b = [d.name], base
            while b is not None:
                if b in chain:
                    raise SchemaError('base chain loops: %s'
                                      % ' -> '.join(chain + [b]))
                chain.append(b)
                b = self.defs[b].expr.get('base')
        own = members_of_dict(d.expr['data'], d.where)
        self.check_members(d.name, own, d.where)
        all_members = self.struct_members(d.name)
        self.check_clashes(all_members, d.where)
        feature_names(d.expr.get('features'), d.where)

    def check_clashes(self, members, where):
        seen = {}
        for m in members:
            cname = m.name.replace('-', '_').lower()
            if cname in seen:
                raise SchemaError('%s: member %r clashes with %r (base)'
                                  % (where, m.name, seen[cname]))
            seen[cname] = m.name

    def check_union(self, d):
        base = d.expr['base']
        if isinstance(base, dict):
            base_members = members_of_dict(base, d.where + ' base')
            self.check_members(d.name, base_members, d.where + ' base')
        elif isinstance(base, str) and self.meta(base) == 'struct':
            base_members = self.struct_members(base)
        else:
            raise SchemaError("union 'base' must be a struct name or an "
                              'inline object')
        disc = d.expr['discriminator']
        dm = [m for m in base_members if m.name == disc]
        if not dm:
            raise SchemaError('discriminator %r is not a member of the base'
                              % disc)
        dm = dm[0]
        if dm.optional:
            raise SchemaError('discriminator %r must not be optional' % disc)
        values = self.enum_values(dm.type) if isinstance(dm.type, str) \
            else None
        if values is None:
            raise SchemaError('discriminator %r must be of an enum type'
                              % disc)
        data = d.expr['data']
        if not isinstance(data, dict):
            raise SchemaError("union 'data' must be an object")
        base_names = {m.name.replace('-', '_').lower() for m in base_members}
        for value, branch in data.items():
            if value not in values:
                raise SchemaError('branch %r is not a value of %s'
                                  % (value, dm.type))
            btype = branch['type'] if isinstance(branch, dict) else branch
            if not isinstance(btype, str) or self.meta(btype) != 'struct':
                raise SchemaError('branch %r type %r must be a struct'
                                  % (value, btype))
            for m in self.struct_members(btype):
                if m.name.replace('-', '_').lower() in base_names:
                    raise SchemaError('branch %r member %r clashes with the '
                                      'base' % (value, m.name))
        missing = [v for v in values if v not in data]
        if missing:
            raise SchemaError('branches missing for %s' % missing)
        feature_names(d.expr.get('features'), d.where)

    def json_kind(self, typ):
        if isinstance(typ, list):
            return 'array'
        if typ in BUILTINS:
            return BUILTINS[typ]
        meta = self.meta(typ)
        return {'enum': 'string', 'struct': 'object',
                'union': 'object'}.get(meta, meta)

    def check_alternate(self, d):
        data = d.expr['data']
        if not isinstance(data, dict) or not data:
            raise SchemaError("alternate 'data' must be a non-empty object")
        kinds = {}
        for name, typ in data.items():
            self.check_member_name(d.name, name)
            typ, _ = type_of(typ, d.where)
            self.check_type_ref(typ, '%s branch %r' % (d.where, name),
                                allow_array=False)
            kind = self.json_kind(typ)
            if kind in ('value', 'alternate'):
                raise SchemaError('branch %r has type %r, which cannot be '
                                  'told apart' % (name, typ))
            if kind in kinds:
                raise SchemaError('branch %r cannot be told apart from %r'
                                  % (name, kinds[kind]))
            kinds[kind] = name
        feature_names(d.expr.get('features'), d.where)

    def check_args(self, d, key, boxed):
        data = d.expr.get(key)
        if data is None:
            if boxed:
                raise SchemaError("'boxed' needs 'data' naming a type")
            return
        if isinstance(data, dict):
            if boxed:
                raise SchemaError("'boxed' needs 'data' naming a type")
            members = members_of_dict(data, d.where)
            self.check_members(d.name, members, d.where)
        elif isinstance(data, str):
            meta = self.meta(data)
            if meta not in ('struct', 'union'):
                raise SchemaError("'data' %r must name a struct%s"
                                  % (data, ' or union' if boxed else ''))
            if meta == 'union' and not boxed:
                raise SchemaError("'data' naming union %r needs 'boxed'"
                                  % data)
        else:
            raise SchemaError("'data' must be an object or a type name")

    def check_command(self, d):
        boxed = d.expr.get('boxed', False)
        if not isinstance(boxed, bool):
            raise SchemaError("'boxed' must be a bool")
        if not isinstance(d.expr.get('allow-oob', False), bool):
            raise SchemaError("'allow-oob' must be a bool")
        self.check_args(d, 'data', boxed)
        if 'returns' in d.expr:
            ret = d.expr['returns']
            if isinstance(ret, list):
                if len(ret) != 1 or not isinstance(ret[0], str):
                    raise SchemaError("'returns' array needs one type")
                elem = ret[0]
            elif isinstance(ret, str):
                elem = ret
            else:
                raise SchemaError("'returns' must be a type or [type]")
            self.check_type_ref(elem, d.where)
            if self.meta(elem) not in ('struct', 'union') and \
                    d.name not in self.pragma['command-returns-exceptions']:
                raise SchemaError('returns %r, not an object (or add it to '
                                  'command-returns-exceptions)' % (ret,))
        feature_names(d.expr.get('features'), d.where)

    def check_event(self, d):
        boxed = d.expr.get('boxed', False)
        if not isinstance(boxed, bool):
            raise SchemaError("'boxed' must be a bool")
        self.check_args(d, 'data', boxed)
        feature_names(d.expr.get('features'), d.where)

    # -- documentation -------------------------------------------------------

    def own_doc_members(self, d):
        """Names the doc block of d must describe."""
        e = d.expr
        if d.meta == 'enum':
            return [v['name'] if isinstance(v, dict) else v for v in e['data']]
        if d.meta == 'struct':
            return [m.name for m in members_of_dict(e['data'], d.where)]
        if d.meta == 'union':
            if isinstance(e['base'], dict):
                return [m.name for m in members_of_dict(e['base'], d.where)]
            return []
        if d.meta == 'alternate':
            return list(e['data'])
        data = e.get('data')
        if isinstance(data, dict):
            return [m.name for m in members_of_dict(data, d.where)]
        return []

    def own_features(self, d):
        e = d.expr
        names = set(feature_names(e.get('features'), d.where))
        if d.meta == 'enum':
            for v in e['data']:
                if isinstance(v, dict):
                    names |= set(feature_names(v.get('features'), d.where))
        else:
            data = e.get('data')
            if d.meta == 'union' and isinstance(e['base'], dict):
                data = e['base']
            if isinstance(data, dict) and d.meta != 'alternate':
                for m in members_of_dict(data, d.where):
                    names |= set(m.features)
        return names

    def check_doc(self, d):
        doc = d.doc
        if doc is None:
            raise SchemaError('%s %r has no doc block' % (d.meta, d.name))
        if doc.symbol != d.name:
            raise SchemaError('doc block documents %r, not %r'
                              % (doc.symbol, d.name))
        if not doc.body:
            raise SchemaError('doc block of %r has no description' % d.name)
        wanted = self.own_doc_members(d)
        for name in wanted:
            if name not in doc.members:
                raise SchemaError('member %r of %r is not documented'
                                  % (name, d.name))
        for name in doc.members:
            if name not in wanted:
                raise SchemaError('documented member %r of %r does not exist'
                                  % (name, d.name))
        feats = self.own_features(d)
        for f in feats:
            if f not in doc.features:
                raise SchemaError('feature %r of %r is not documented'
                                  % (f, d.name))
        for f in doc.features:
            if f not in feats:
                raise SchemaError('documented feature %r of %r does not exist'
                                  % (f, d.name))
        tags = [s[0] for s in doc.sections]
        if d.meta != 'command' and 'Returns' in tags:
            raise SchemaError('only commands may have a "Returns:" section')
        if 'Since' not in tags:
            raise SchemaError('doc block of %r lacks "Since:"' % d.name)

    # -- fixtures --------------------------------------------------------------

    def check_fixture_commands(self, path, verbose):
        relaxed = []
        count = 0
        with open(path, encoding='utf-8') as f:
            for n, raw in enumerate(f, 1):
                line = raw.strip()
                if not line or line.startswith('#'):
                    continue
                count += 1
                where = '%s:%d' % (os.path.basename(path), n)
                ret = None
                if '->' in line:
                    line, ret = [p.strip() for p in line.split('->', 1)]
                words = line.split()
                name, args = words[0], words[1:]
                d = self.defs.get(name)
                if d is None or d.meta != 'command':
                    self.err('%s: command %r not in the schema' % (where, name))
                    continue
                have = self.args_of(d)
                for a in args:
                    opt = a.startswith('*')
                    a = a.lstrip('*')
                    if name == 'blockdev-add' and a == 'options':
                        # The seed's blockdev-add wraps the options in
                        # 'options'; the schema has QEMU's stable flat form
                        # and the handler unwraps the old one.
                        continue
                    m = have.get(a)
                    if m is None:
                        self.err('%s: %s has no argument %r' % (where, name, a))
                    elif opt and not m.optional:
                        self.err('%s: %s argument %r is optional in the seed '
                                 'but mandatory in the schema'
                                 % (where, name, a))
                    elif not opt and m.optional:
                        relaxed.append('%s %s' % (name, a))
                if ret is not None:
                    sret = d.expr.get('returns')
                    want = [ret[1:-1]] if ret.startswith('[') else ret
                    if sret != want:
                        self.err('%s: %s returns %r in the schema, the seed '
                                 'says %s' % (where, name, sret, ret))
        self.notes.append('%d seed commands checked; %d seed-mandatory '
                          'arguments are optional in the schema'
                          % (count, len(relaxed)))
        if verbose:
            for r in relaxed:
                self.notes.append('  relaxed: %s' % r)

    def check_fixture_definitions(self, path):
        count = 0
        with open(path, encoding='utf-8') as f:
            for n, raw in enumerate(f, 1):
                line = raw.strip()
                if not line or line.startswith('#'):
                    continue
                count += 1
                where = '%s:%d' % (os.path.basename(path), n)
                words = line.split()
                if len(words) < 2:
                    self.err('%s: malformed line' % where)
                    continue
                kind, name, items = words[0], words[1], words[2:]
                d = self.defs.get(name)
                if d is None:
                    self.err('%s: %s %r not in the schema' % (where, kind, name))
                    continue
                if d.meta != kind:
                    self.err('%s: %r is a %s in the schema, a %s in the seed'
                             % (where, name, d.meta, kind))
                    continue
                if kind == 'enum':
                    have = self.enum_values(name)
                    for v in items:
                        if v not in have:
                            self.err('%s: enum %s lacks value %r'
                                     % (where, name, v))
                    continue
                if kind in ('command', 'event'):
                    have = self.args_of(d)
                elif kind == 'alternate':
                    have = {k: None for k in d.expr['data']}
                else:
                    have = self.type_members(name)
                if kind == 'union':
                    # A union's line lists its branches (the values of the
                    # discriminator), like the seed's simple unions.
                    for branch in d.expr['data']:
                        have.setdefault(branch, None)
                for item in items:
                    opt = item.startswith('*')
                    item = item.lstrip('*')
                    if name == 'blockdev-add' and item == 'options':
                        continue        # see check_fixture_commands
                    if item not in have:
                        self.err('%s: %s %s lacks member %r'
                                 % (where, kind, name, item))
                    elif opt and have[item] is not None and \
                            not have[item].optional and kind != 'alternate':
                        self.err('%s: %s %s member %r is optional in the seed'
                                 ' but mandatory in the schema'
                                 % (where, kind, name, item))
        self.notes.append('%d seed definitions checked' % count)


def main(argv):
    verbose = '-v' in argv
    args = [a for a in argv if a != '-v']
    here = os.path.dirname(os.path.abspath(__file__))
    root = args[0] if args else os.path.join(here, '..', 'qapi-schema.json')
    try:
        schema = Schema(root)
        schema.check()
    except SchemaError as e:
        print('error: %s' % e)
        return 1
    tests = os.path.dirname(os.path.abspath(root))
    for fixture, fn in (('seed-commands.txt', schema.check_fixture_commands),
                        ('seed-definitions.txt',
                         schema.check_fixture_definitions)):
        path = os.path.join(tests, 'tests', fixture)
        if not os.path.exists(path):
            schema.err('fixture %s is missing' % path)
        elif fixture == 'seed-commands.txt':
            fn(path, verbose)
        else:
            fn(path)
    counts = {}
    for d in schema.order:
        key = (os.path.basename(d.fname), d.meta)
        counts[key] = counts.get(key, 0) + 1
    if verbose:
        for f in schema.files:
            base = os.path.basename(f)
            parts = ['%d %s' % (counts[(base, m)], m)
                     for m in ('enum', 'struct', 'union', 'alternate',
                               'command', 'event') if (base, m) in counts]
            print('%-22s %s' % (base, ', '.join(parts) or '-'))
    for note in schema.notes:
        print(note)
    for e in schema.errors:
        print('error: %s' % e)
    print('%d definitions in %d files, %d errors'
          % (len(schema.order), len(schema.files), len(schema.errors)))
    return 1 if schema.errors else 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
