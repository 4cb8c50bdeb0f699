// SPDX-License-Identifier: Apache-2.0
//
// The experiments' text: data every Debian 12 machine has, nothing downloaded.
//
//   - The pure-Python modules of the standard library that Debian's python3 package installs
//     (python3 -> python3.11 -> libpython3.11-minimal and libpython3.11-stdlib), top level of
//     /usr/lib/python3.11: 160 files, 4.6 MB of source code with long-range structure (a name
//     is defined at the top of a file and used hundreds of lines later).
//   - The licence texts of /usr/share/common-licenses (package base-files), 0.3 MB of prose.
//
// The file list is fixed (kPythonModules, kLicences below) and so is the split: every tenth
// module of the sorted list (the 5th, 15th, ...) and the MPL-2.0 licence are validation, the
// rest training. Files are concatenated in list order with a form feed between them. The
// checksum (FNV-1a, 64 bits, of each split's bytes) is printed with every result, so results
// from two machines compare only when the checksums agree (a Debian point release that patches
// a module changes it). A missing or unreadable file stops the program with its path and what
// to install.
#pragma once

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

namespace titans_experiments {

inline constexpr const char* kPythonModules[] = {
    "_collections_abc", "_compat_pickle", "_compression", "_markupbase", "_py_abc", "_pydecimal", "_pyio",
    "_sitebuiltins", "_strptime", "_threading_local", "_weakrefset", "abc", "aifc", "argparse", "ast",
    "asynchat", "asyncore", "base64", "bdb", "bisect", "bz2", "cProfile", "calendar",
    "cgi", "cgitb", "chunk", "cmd", "code", "codecs", "codeop", "colorsys",
    "compileall", "configparser", "contextlib", "contextvars", "copy", "copyreg", "crypt", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "dis", "doctest", "enum", "filecmp",
    "fileinput", "fnmatch", "fractions", "ftplib", "functools", "genericpath", "getopt", "getpass",
    "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac", "imaplib",
    "imghdr", "imp", "inspect", "io", "ipaddress", "keyword", "linecache", "locale",
    "lzma", "mailbox", "mailcap", "mimetypes", "modulefinder", "netrc", "nntplib", "ntpath",
    "nturl2path", "numbers", "opcode", "operator", "optparse", "os", "pathlib", "pdb",
    "pickle", "pickletools", "pipes", "pkgutil", "platform", "plistlib", "poplib", "posixpath",
    "pprint", "profile", "pstats", "pty", "py_compile", "pyclbr", "pydoc", "queue",
    "quopri", "random", "reprlib", "rlcompleter", "runpy", "sched", "secrets", "selectors",
    "shelve", "shlex", "shutil", "signal", "site", "smtpd", "smtplib", "sndhdr",
    "socket", "socketserver", "sre_compile", "sre_constants", "sre_parse", "ssl", "stat", "statistics",
    "string", "stringprep", "struct", "subprocess", "sunau", "symtable", "sysconfig", "tabnanny",
    "tarfile", "telnetlib", "tempfile", "textwrap", "threading", "timeit", "token", "tokenize",
    "trace", "traceback", "tracemalloc", "tty", "turtle", "types", "typing", "uu",
    "uuid", "warnings", "wave", "weakref", "webbrowser", "xdrlib", "zipapp", "zipfile",
    "zipimport",
};

inline constexpr const char* kLicences[] = {
    "Apache-2.0", "Artistic", "BSD", "CC0-1.0", "GFDL-1.2", "GFDL-1.3", "GPL-1", "GPL-2",
    "GPL-3", "LGPL-2", "LGPL-2.1", "LGPL-3", "MPL-1.1", "MPL-2.0",
};

/// Where the files are (the defaults are Debian 12's; --python-dir / --licence-dir override).
struct CorpusPaths {
  std::string python_dir = "/usr/lib/python3.11";
  std::string licence_dir = "/usr/share/common-licenses";
};

/// FNV-1a, 64 bits.
inline std::uint64_t fnv1a(const std::vector<unsigned char>& bytes) {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  for (unsigned char c : bytes) {
    h ^= c;
    h *= 0x100000001b3ULL;
  }
  return h;
}

struct Corpus {
  std::vector<unsigned char> train, validation;  ///< the splits' bytes
  std::size_t train_files = 0, validation_files = 0;

  /// "train 4.2 MB in 140 files (fnv1a 0123...), validation ..."
  std::string describe() const {
    char buf[256];
    std::snprintf(buf, sizeof buf,
                  "train %.2f MB in %zu files (fnv1a %016llx), validation %.2f MB in %zu files (fnv1a %016llx)",
                  static_cast<double>(train.size()) / 1e6, train_files,
                  static_cast<unsigned long long>(fnv1a(train)), static_cast<double>(validation.size()) / 1e6,
                  validation_files, static_cast<unsigned long long>(fnv1a(validation)));
    return buf;
  }
};

/// Reads one file whole; throws std::runtime_error naming it and what provides it.
inline std::vector<unsigned char> read_file(const std::string& path, const char* package) {
  std::ifstream in(path, std::ios::binary);
  if (!in)
    throw std::runtime_error("corpus: cannot open '" + path + "' (it comes with Debian's " + package +
                             " package; install it, or point the directory option at a copy)");
  std::vector<unsigned char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw std::runtime_error("corpus: reading '" + path + "' failed");
  if (bytes.empty()) throw std::runtime_error("corpus: '" + path + "' is empty");
  return bytes;
}

/// The fixed corpus (file comment): every tenth Python module (index % 10 == 4) and MPL-2.0
/// are validation.
inline Corpus load_corpus(const CorpusPaths& paths = {}) {
  Corpus c;
  auto append = [](std::vector<unsigned char>& dst, const std::vector<unsigned char>& src) {
    if (!dst.empty()) dst.push_back('\f');
    dst.insert(dst.end(), src.begin(), src.end());
  };
  std::size_t i = 0;
  for (const char* m : kPythonModules) {
    const bool val = i++ % 10 == 4;
    append(val ? c.validation : c.train, read_file(paths.python_dir + "/" + m + ".py", "python3 (libpython3.11-stdlib)"));
    (val ? c.validation_files : c.train_files) += 1;
  }
  for (const char* l : kLicences) {
    const bool val = std::string(l) == "MPL-2.0";
    append(val ? c.validation : c.train, read_file(paths.licence_dir + "/" + l, "base-files"));
    (val ? c.validation_files : c.train_files) += 1;
  }
  return c;
}

}  // namespace titans_experiments
