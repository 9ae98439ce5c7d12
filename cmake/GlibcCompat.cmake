# Links the extension so that it needs no glibc newer than TOKCORE_GLIBC_COMPAT_VERSION
# (2.28: the wheel is then manylinux_2_28), while still compiling with the machine's gcc
# and nvcc against its newer glibc headers:
#  - the link sees glibc 2.28 stub libraries (libc.so.6, libpthread.so.0, ...) instead of
#    the system's, so every glibc reference, ours and libcudart_static's, binds to a
#    symbol version that glibc 2.28 has; zig, which ships the symbol lists of every glibc
#    release, writes the stubs (pip install ziglang);
#  - libstdc++ is linked statically and its symbols are kept private (no GLIBCXX_3.4.26+
#    requirements). Safe because the stable ABI passes only C types across the torch
#    boundary; libgcc_s stays shared so that one unwinder serves torch's frames and ours;
#  - csrc/common/glibc_compat.cpp defines the three glibc symbols that gcc 12's
#    libstdc++ uses and glibc 2.28 lacks;
#  - --no-undefined turns any other symbol that glibc 2.28 lacks into a link error.

# OFF by default, so that a zig that happens to be installed never changes a
# developer's build; scripts/build_wheel.sh turns it ON.
set(TOKCORE_GLIBC_COMPAT "OFF" CACHE STRING
    "Link for glibc 2.28 (manylinux_2_28) with zig-made stub libraries: OFF, ON, or AUTO (when zig is found)")
set_property(CACHE TOKCORE_GLIBC_COMPAT PROPERTY STRINGS AUTO ON OFF)
set(TOKCORE_GLIBC_COMPAT_VERSION "2.28" CACHE STRING "Oldest glibc the extension must load on")

# Sets TOKCORE_ZIG_COMMAND to a zig command (zig on PATH, or python -m ziglang), or empty.
function(tokcore_find_zig)
  set(TOKCORE_ZIG_COMMAND "" PARENT_SCOPE)
  find_program(TOKCORE_ZIG_PROGRAM zig)
  if(TOKCORE_ZIG_PROGRAM)
    set(TOKCORE_ZIG_COMMAND "${TOKCORE_ZIG_PROGRAM}" PARENT_SCOPE)
  elseif(Python_EXECUTABLE)
    execute_process(COMMAND "${Python_EXECUTABLE}" -m ziglang version
                    RESULT_VARIABLE rc OUTPUT_QUIET ERROR_QUIET)
    if(rc EQUAL 0)
      set(TOKCORE_ZIG_COMMAND "${Python_EXECUTABLE};-m;ziglang" PARENT_SCOPE)
    endif()
  endif()
endfunction()

# Writes the stub libraries into <dir> (once per build directory and version).
function(tokcore_make_glibc_stubs dir)
  set(version "${TOKCORE_GLIBC_COMPAT_VERSION}")
  if(EXISTS "${dir}/libc.so")
    return()
  endif()
  set(work "${CMAKE_BINARY_DIR}/glibc-compat-work")
  file(REMOVE_RECURSE "${work}")
  file(WRITE "${work}/empty.c" "")
  # Linking an empty library for x86_64-linux-gnu.<version> makes zig write the stubs
  # into its cache; a private cache directory makes them easy to find.
  execute_process(
    COMMAND "${CMAKE_COMMAND}" -E env "ZIG_GLOBAL_CACHE_DIR=${work}/cache" "ZIG_LOCAL_CACHE_DIR=${work}/cache"
            ${TOKCORE_ZIG_COMMAND} cc -target "x86_64-linux-gnu.${version}" -shared -o "${work}/empty.so"
            "${work}/empty.c" -lm -lpthread -ldl -lrt
    RESULT_VARIABLE rc ERROR_VARIABLE err)
  file(GLOB_RECURSE libc_stub "${work}/cache/libc.so.6")
  if(NOT rc EQUAL 0 OR NOT libc_stub)
    message(FATAL_ERROR "tokcore: zig could not make glibc ${version} stubs (${rc}): ${err}")
  endif()
  list(GET libc_stub 0 libc_stub)
  get_filename_component(stubs "${libc_stub}" DIRECTORY)
  file(MAKE_DIRECTORY "${dir}")
  foreach(lib libc.so.6 libm.so.6 libpthread.so.0 libdl.so.2 librt.so.1 libld.so.2)
    file(COPY "${stubs}/${lib}" DESTINATION "${dir}")
  endforeach()
  foreach(lib m pthread dl rt)
    file(GLOB so "${dir}/lib${lib}.so.*")
    file(CREATE_LINK "${so}" "${dir}/lib${lib}.so" SYMBOLIC)
  endforeach()
  # -lc: the stub libc plus the system's libc_nonshared.a (atexit, pthread_atfork, ...),
  # as the system's own libc.so linker script does.
  execute_process(COMMAND "${CMAKE_CXX_COMPILER}" -print-file-name=libc_nonshared.a
                  OUTPUT_VARIABLE nonshared OUTPUT_STRIP_TRAILING_WHITESPACE)
  file(WRITE "${dir}/libc.so"
       "GROUP ( ${dir}/libc.so.6 ${nonshared} AS_NEEDED ( ${dir}/libld.so.2 ) )\n")
  file(REMOVE_RECURSE "${work}")
endfunction()

# Applies the glibc compatibility link to <target> when TOKCORE_GLIBC_COMPAT allows it.
function(tokcore_glibc_compat target)
  set(supported OFF)
  if(CMAKE_SYSTEM_NAME STREQUAL "Linux" AND CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64"
     AND CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    set(supported ON)
  endif()
  set(use OFF)
  if(NOT TOKCORE_GLIBC_COMPAT STREQUAL "OFF" AND supported)
    tokcore_find_zig()
    if(TOKCORE_ZIG_COMMAND)
      set(use ON)
    endif()
  endif()
  if(TOKCORE_GLIBC_COMPAT STREQUAL "ON" AND NOT use)
    message(FATAL_ERROR "TOKCORE_GLIBC_COMPAT=ON needs Linux x86-64, gcc and zig (pip install ziglang)")
  endif()
  message(STATUS "tokcore: glibc ${TOKCORE_GLIBC_COMPAT_VERSION} compatible link ${use}")
  if(NOT use)
    return()
  endif()
  set(dir "${CMAKE_BINARY_DIR}/glibc-${TOKCORE_GLIBC_COMPAT_VERSION}")
  tokcore_make_glibc_stubs("${dir}")
  target_sources(${target} PRIVATE "${PROJECT_SOURCE_DIR}/csrc/common/glibc_compat.cpp")
  # A user -L comes before gcc's own directories, so -lc, -lpthread, ... find the
  # stubs. Not target_link_directories: that would put the stubs into the build RPATH.
  # -pthread: in glibc 2.28 libstdc++'s pthread_once etc. live in libpthread.so.0.
  target_link_options(${target} PRIVATE "-L${dir}" -static-libstdc++ -pthread
                      "LINKER:--exclude-libs,ALL" "LINKER:--no-undefined")
endfunction()
